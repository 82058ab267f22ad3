//! Offline chat prompts for training, calibrating and evaluating a family: templates ×
//! topics written for this project (licence: the project's own), split **by topic** into
//! disjoint sets, so held-out prompts are about things training never saw.
//!
//! [`chat_prompts`] returns `n` prompts of a [`Split`], deterministic in `(split, seed)`.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Which disjoint share of the topics a prompt set draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// ~70 % of the topics: distillation data.
    Train,
    /// ~10 %: threshold calibration.
    Calibrate,
    /// ~20 %: held-out evaluation and benchmarks.
    Test,
}

const TEMPLATES: &[&str] = &[
    "What is {t}?",
    "Explain {t} to a ten-year-old.",
    "Give me three interesting facts about {t}.",
    "Write a short poem about {t}.",
    "Write a haiku about {t}.",
    "What are the pros and cons of {t}?",
    "How would you describe {t} to someone who has never seen it?",
    "Tell me a short story that involves {t}.",
    "Why is {t} important?",
    "What is the history of {t}, in a few sentences?",
    "List five words that come to mind when you think of {t}.",
    "Give me some tips for learning about {t}.",
    "What are common misconceptions about {t}?",
    "Summarize what people should know about {t} in two sentences.",
    "Write a tweet about {t}.",
    "Can you suggest a fun activity related to {t}?",
    "What questions would a scientist ask about {t}?",
    "Describe {t} in one paragraph.",
    "How does {t} affect everyday life?",
    "Write a friendly email to a colleague about {t}.",
    "What is a good name for a blog about {t}?",
    "Create a short quiz with two questions about {t}.",
    "Is {t} good or bad? Explain your answer.",
    "What would the world be like without {t}?",
    "Write a product description for something inspired by {t}.",
    "Give an analogy that explains {t}.",
    "What are the main parts or kinds of {t}?",
    "How can a beginner get started with {t}?",
    "Write a limerick about {t}.",
    "Explain {t} in simple terms.",
    "What skills are useful when dealing with {t}?",
    "Tell me a joke about {t}.",
    "What are three questions children often ask about {t}?",
    "Write the opening sentence of a novel about {t}.",
    "How has {t} changed over the last hundred years?",
    "What should I avoid when it comes to {t}?",
    "Describe a day in the life of someone who works with {t}.",
    "What is the most surprising thing about {t}?",
    "Compare {t} and {u}.",
    "What do {t} and {u} have in common?",
    "Write a short dialogue between two friends about {t}.",
    "Which is more useful, {t} or {u}? Why?",
];

const TOPICS: &str = "the ocean,volcanoes,honeybees,the moon,photosynthesis,electricity,\
rainbows,the human heart,glaciers,deserts,rain forests,the internet,bicycles,trains,airplanes,\
sailing,chess,football,basketball,tennis,swimming,running,yoga,meditation,sleep,coffee,tea,\
chocolate,bread,cheese,pizza,rice,apples,bananas,tomatoes,potatoes,mushrooms,spices,cooking,\
baking,gardening,composting,recycling,solar power,wind turbines,batteries,magnets,gravity,\
black holes,stars,planets,Mars,Jupiter,comets,telescopes,microscopes,bacteria,viruses,vaccines,\
DNA,evolution,dinosaurs,fossils,birds,owls,penguins,eagles,parrots,cats,dogs,horses,cows,\
elephants,giraffes,lions,tigers,wolves,foxes,bears,whales,dolphins,sharks,octopuses,jellyfish,\
coral reefs,butterflies,ants,spiders,frogs,snakes,turtles,trees,flowers,roses,cacti,moss,\
mountains,rivers,lakes,islands,caves,earthquakes,hurricanes,tornadoes,snow,clouds,lightning,\
seasons,autumn,winter,spring,summer,calendars,clocks,maps,compasses,libraries,books,poetry,\
novels,newspapers,letters,postcards,museums,paintings,sculpture,photography,music,pianos,\
guitars,drums,violins,singing,dancing,theatre,movies,cartoons,video games,board games,puzzles,\
mathematics,prime numbers,fractions,geometry,statistics,probability,algebra,calculus,logic,\
computers,programming,robots,artificial intelligence,smartphones,cameras,televisions,radio,\
satellites,rockets,space stations,astronauts,bridges,skyscrapers,castles,pyramids,cities,\
villages,farms,markets,money,banks,savings,budgets,taxes,shopping,advertising,friendship,\
kindness,honesty,patience,courage,curiosity,creativity,leadership,teamwork,teachers,schools,\
homework,exams,universities,scientists,doctors,nurses,firefighters,farmers,engineers,artists,\
writers,chefs,pilots,hospitals,exercise,vitamins,water,salt,sugar,bicycle repair,carpentry,\
knitting,sewing,pottery,origami,camping,hiking,fishing,picnics,birthdays,holidays,festivals,\
fireworks,weddings,languages,grammar,dictionaries,translation,the alphabet,handwriting,\
typewriters,printing presses,paper,ink,pencils,glass,steel,plastic,wood,cotton,wool,silk,\
diamonds,gold,silver,copper,iron,oxygen,carbon,hydrogen,salt water,tides,waves,wind,fire,\
ice,steam,bubbles,soap,toothbrushes,umbrellas,shoes,hats,clothing,fashion,architecture,\
furniture,lamps,candles,mirrors,windows,doors,keys,locks,elevators,escalators,cars,buses,\
traffic lights,roads,tunnels,ships,submarines,lighthouses,harbors,airports,passports,travel,\
tourism,hotels,restaurants,recipes,breakfast,soup,salad,noodles,dumplings,ice cream,honey,\
milk,eggs,beans,corn,wheat,olive oil,lemons,oranges,strawberries,grapes,coconuts,pineapples,\
volunteering,charity,democracy,elections,laws,courts,history,ancient Rome,ancient Egypt,\
the Middle Ages,the Renaissance,the printing revolution,the industrial revolution,inventions,\
the wheel,the telephone,the light bulb,vaccination,antibiotics,x-rays,thermometers,weather \
forecasts,climate,pollution,forests,wildlife conservation,national parks,zoos,aquariums,\
pets,goldfish,hamsters,rabbits,chickens,sheep,goats,pigs,ducks,swans,crows,bats,hedgehogs,\
squirrels,beavers,kangaroos,koalas,pandas,camels,zebras,rhinos,hippos,crocodiles,seals,\
walruses,polar bears,the Arctic,Antarctica,the Sahara,the Amazon,the Himalayas,the Alps,\
jazz,opera,rock music,folk songs,lullabies,orchestras,choirs,microphones,headphones,podcasts,\
blogs,email,passwords,cybersecurity,databases,spreadsheets,search engines,social media,\
online learning,remote work,time management,productivity,procrastination,habits,goals,\
motivation,happiness,stress,laughter,empathy,memory,dreams,the brain,eyes,ears,teeth,bones,\
muscles,breathing,nutrition,first aid,hand washing,stretching,walking,gardening tools,\
hammers,screwdrivers,ladders,ropes,knots,tents,flashlights,maps and navigation,kites,\
balloons,paper airplanes,snowmen,sandcastles,seashells,pebbles,crystals,rainwater,wells";

fn split_of(index: usize) -> Split {
    // A fixed interleave: 7 train, 1 calibrate, 2 test out of every 10 topics.
    match index % 10 {
        7 => Split::Calibrate,
        8 | 9 => Split::Test,
        _ => Split::Train,
    }
}

/// The topics of `split`.
pub fn topics(split: Split) -> Vec<&'static str> {
    TOPICS
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .enumerate()
        .filter(|(i, _)| split_of(*i) == split)
        .map(|(_, t)| t)
        .collect()
}

/// `n` distinct user prompts of `split`, deterministic in `(split, seed)`. Panics never;
/// when `n` exceeds the distinct prompts available the list is shorter.
pub fn chat_prompts(split: Split, n: usize, seed: u64) -> Vec<String> {
    let topics = topics(split);
    let mut all = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_cafe);
    for (i, t) in topics.iter().enumerate() {
        for tpl in TEMPLATES {
            let u = if tpl.contains("{u}") {
                // A partner topic from the same split, never the topic itself.
                let mut j = rng.gen_range(0..topics.len());
                if j == i {
                    j = (j + 1) % topics.len();
                }
                topics[j]
            } else {
                ""
            };
            all.push(tpl.replace("{t}", t).replace("{u}", u));
        }
    }
    all.shuffle(&mut rng);
    all.truncate(n);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_disjoint_by_topic_and_deterministic() {
        let tr = topics(Split::Train);
        let ca = topics(Split::Calibrate);
        let te = topics(Split::Test);
        assert!(tr.len() > 250 && ca.len() > 30 && te.len() > 70);
        for t in &te {
            assert!(!tr.contains(t) && !ca.contains(t), "{t} in two splits");
        }
        let a = chat_prompts(Split::Test, 300, 1);
        assert_eq!(a, chat_prompts(Split::Test, 300, 1));
        assert_ne!(a, chat_prompts(Split::Test, 300, 2));
        let uniq: std::collections::HashSet<_> = a.iter().collect();
        assert_eq!(uniq.len(), a.len());
        assert!(a.iter().all(|p| !p.contains('{')));
    }
}
