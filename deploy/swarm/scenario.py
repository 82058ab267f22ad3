#!/usr/bin/env python3
"""The swarm fault scenario: deploy/swarm/stack.yml under a BurstGPT replay, with faults.

Steps: `docker swarm init` unless this machine is already in a swarm (and `swarm leave`
afterwards if it was not), node labels, certificates (make-pki.sh), `docker stack deploy`,
wait until every task is healthy, then replay the trace open-loop against the four devices
with `flow-node testbed load` in a container on the stack's `access` network while these
faults are applied at their times (seconds after the load starts):

  15  scale edge1 to 0          (its devices fail over to edge2)
  30  scale edge1 back to 1
  45  kill edge2's task         (swarm restarts it)
  60  rolling update of the cloud to another image tag (start-first), requests in flight

Every scheduled request must end answered (possibly degraded) or with an explicit error:
`--check` fails on a lost, shed or hung request and on one failed by the server (5xx or
no HTTP answer); a 4xx refusal (429) counts as answered. Writes summary.json and report.md to --out with
p50/p99 latency in the steady state (before the first fault) and in each fault's window.
Needs docker and the node image (`flow-node testbed image`); no registry.

  deploy/swarm/scenario.py --image aiflow-node:dev --check
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEVICES = ["device1", "device2", "device3", "device4"]


def sh(*cmd, check=True, capture=True):
    r = subprocess.run(cmd, capture_output=capture, text=True)
    if check and r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {r.returncode}: {(r.stderr or '').strip()}")
    return (r.stdout or "").strip()


def schedule_from_trace(path, duration_s, prompt_cap, max_tokens_cap):
    """What `flow-node testbed run` does: fit the trace into 80% of the run (cut at 85%)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    ts = sorted(float(r["Timestamp"]) for r in rows)
    speed = max((ts[-1] - ts[0]) / (0.8 * duration_s), 1e-3) if ts[-1] > ts[0] else 1.0
    rows.sort(key=lambda r: float(r["Timestamp"]))
    t0 = float(rows[0]["Timestamp"])
    reqs = []
    for r in rows:
        at = (float(r["Timestamp"]) - t0) / speed
        if at >= 0.85 * duration_s:
            continue
        resp = int(r["Response tokens"])
        secs = int(at)
        reqs.append({
            "id": len(reqs),
            "send_at": {"secs": secs, "nanos": int(round((at - secs) * 1e9)) % 1_000_000_000},
            "prompt_tokens": max(1, min(int(r["Request tokens"]), prompt_cap)),
            "max_tokens": min(max_tokens_cap, 4) if resp == 0 else min(resp, max_tokens_cap),
            "session": r.get("Session ID") or None,
            "model": r["Model"],
            "failed_in_trace": resp == 0,
        })
    return {"requests": reqs}, speed


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))]


class Swarm:
    def __init__(self, a):
        self.a = a
        self.stack = a.stack
        self.joined = False

    def svc(self, name):
        return f"{self.stack}_{name}"

    def init(self):
        state = sh("docker", "info", "-f", "{{.Swarm.LocalNodeState}}")
        if state != "active":
            r = subprocess.run(["docker", "swarm", "init"], capture_output=True, text=True)
            if r.returncode != 0:  # several addresses: pick loopback for a one-node swarm
                sh("docker", "swarm", "init", "--advertise-addr", "127.0.0.1")
            self.joined = True
        node = sh("docker", "node", "inspect", "self", "-f", "{{.ID}}")
        sh("docker", "node", "update", "--label-add", "aiflow.cloud=true", "--label-add",
           "aiflow.edge=true", "--label-add", "aiflow.device=true", node)

    def deploy(self, pki):
        env = dict(os.environ, AIFLOW_IMAGE=self.a.image, AIFLOW_PKI=pki)
        subprocess.run([os.path.join(HERE, "make-pki.sh")], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["docker", "stack", "deploy", "--resolve-image", "never", "-c",
                        os.path.join(HERE, "stack.yml"), self.stack], env=env, check=True,
                       stdout=subprocess.DEVNULL)

    def containers(self, service):
        out = sh("docker", "ps", "--filter", f"label=com.docker.swarm.service.name={self.svc(service)}",
                 "--format", "{{.ID}} {{.Status}}")
        return [line.split(" ", 1) for line in out.splitlines() if line]

    def wait_healthy(self, services, timeout_s):
        end = time.time() + timeout_s
        while time.time() < end:
            if all(any("(healthy)" in st for _, st in self.containers(s)) for s in services):
                return
            time.sleep(1)
        raise SystemExit(f"not healthy within {timeout_s} s: " + ", ".join(
            f"{s}={self.containers(s)}" for s in services))

    def down(self):
        subprocess.run(["docker", "stack", "rm", self.stack], capture_output=True)
        for _ in range(60):  # networks go last
            if not sh("docker", "network", "ls", "-q", "--filter", f"label=com.docker.stack.namespace={self.stack}"):
                break
            time.sleep(1)
        if self.joined:
            subprocess.run(["docker", "swarm", "leave", "--force"], capture_output=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default=os.environ.get("AIFLOW_IMAGE", "aiflow-node:dev"))
    p.add_argument("--stack", default="aiflow")
    p.add_argument("--duration-s", type=float, default=90.0)
    p.add_argument("--trace", default=os.path.join(REPO, "testbed/traces/sample_burstgpt.csv"))
    p.add_argument("--mode", default="escalate")
    p.add_argument("--timeout-s", type=float, default=15.0)
    p.add_argument("--prompt-tokens-cap", type=int, default=192)
    p.add_argument("--max-tokens-cap", type=int, default=24)
    p.add_argument("--out", default=os.path.join(REPO, "target/swarm"))
    p.add_argument("--check", action="store_true", help="fail on a lost, shed, hung or server-failed request")
    p.add_argument("--keep", action="store_true", help="leave the stack running")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    sh("docker", "image", "inspect", a.image)
    next_image = a.image.rsplit(":", 1)[0] + ":swarm-next"
    sh("docker", "tag", a.image, next_image)

    sw = Swarm(a)
    pki = tempfile.mkdtemp(prefix="aiflow-pki-")
    try:
        sw.init()
        t = time.time()
        sw.deploy(pki)
        sw.wait_healthy(["cloud", "edge1", "edge2"] + DEVICES, 240)
        up_s = time.time() - t
        print(f"stack {a.stack}: 7 services healthy in {up_s:.0f} s", flush=True)
        result = run_load(a, sw, next_image)
        result["deploy_to_healthy_s"] = round(up_s, 1)
    finally:
        if not a.keep:
            sw.down()
        subprocess.run(["docker", "image", "rm", next_image], capture_output=True)
        subprocess.run(["rm", "-rf", pki])
    return report(a, result)


def run_load(a, sw, next_image):
    schedule, speed = schedule_from_trace(a.trace, a.duration_s, a.prompt_tokens_cap, a.max_tokens_cap)
    lead_s = 4.0
    t0 = time.time() + lead_s
    cmd = ["docker", "run", "--rm", "-i", "--network", f"{a.stack}_access", a.image,
           "testbed", "load", "--mode", a.mode, "--timeout-s", str(a.timeout_s),
           "--start-at-unix-ms", str(int(t0 * 1000))]
    for d in DEVICES:
        cmd += ["--target", f"http://{d}:8080"]
    load = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    out = {}
    reader = threading.Thread(target=lambda: out.setdefault("stdout", load.communicate(json.dumps(schedule))[0]))
    reader.start()

    def at(s):
        time.sleep(max(0.0, t0 + s - time.time()))
        return round(time.time() - t0, 2)

    events = []
    events.append(("scale edge1=0", at(15), sh("docker", "service", "scale", "-d", f"{sw.svc('edge1')}=0")))
    events.append(("scale edge1=1", at(30), sh("docker", "service", "scale", "-d", f"{sw.svc('edge1')}=1")))
    victim = sw.containers("edge2")[0][0]
    events.append(("kill edge2 task", at(45), sh("docker", "kill", victim)))
    t_upd = at(60)
    sh("docker", "service", "update", "-d", "--image", next_image, sw.svc("cloud"))
    state = ""
    while state not in ("completed", "rollback_completed", "paused", "rollback_paused"):
        time.sleep(0.5)
        state = sh("docker", "service", "inspect", "-f", "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}", sw.svc("cloud"))
        if time.time() - t0 > a.duration_s + a.timeout_s + 60:
            break
    t_upd_done = round(time.time() - t0, 2)
    events.append((f"rolling update cloud -> {next_image}: {state}", t_upd, t_upd_done))
    reader.join(timeout=a.duration_s + a.timeout_s + 120)
    if load.returncode not in (0, None) or "stdout" not in out:
        raise SystemExit(f"the load generator failed (exit {load.returncode})")
    records = json.loads(out["stdout"])
    for name, t, detail in events:
        print(f"t={t:6.2f}s {name}", flush=True)
    return {"schedule": schedule, "speed": speed, "records": records, "events": events,
            "update": (t_upd, t_upd_done), "services": {
                s: sh("docker", "service", "ps", "--format", "{{.Name}} {{.CurrentState}} {{.Error}}", sw.svc(s), check=False)
                for s in ["cloud", "edge1", "edge2"]}}


def kind(x):
    return x["outcome"]["kind"]  # answered | error | shed (serde: tag "kind", content "detail")


def report(a, r):
    recs = r["records"]
    with open(os.path.join(a.out, "records.json"), "w") as f:
        json.dump(recs, f)
    want = {q["id"] for q in r["schedule"]["requests"]}
    got = {x["id"] for x in recs}
    lost = sorted(want - got)
    answered = [x for x in recs if kind(x) == "answered"]
    errors = [x for x in recs if kind(x) == "error"]
    shed = [x for x in recs if kind(x) == "shed"]
    degraded = sum(1 for x in answered if x.get("degraded"))
    t_upd, t_done = r["update"]
    windows = {
        "steady (0-15 s)": (0, 15),
        "edge1 scaled to 0 (15-30 s)": (15, 30),
        "edge2 task killed (45-60 s)": (45, 60),
        f"cloud rolling update ({t_upd:.0f}-{t_done + 5:.0f} s)": (t_upd, t_done + 5),
        "whole run": (0, 1e9),
    }
    rows = {}
    for name, (lo, hi) in windows.items():
        xs = [x for x in recs if lo * 1000 <= x["scheduled_ms"] < hi * 1000]
        lat = [x["latency_ms"] for x in xs if kind(x) == "answered" and x["latency_ms"] is not None]
        rows[name] = {"requests": len(xs), "answered": len(lat),
                      "errors": sum(1 for x in xs if kind(x) == "error"),
                      "degraded": sum(1 for x in xs if x.get("degraded")),
                      "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
    steady = rows["steady (0-15 s)"]["p99_ms"]
    upd = next(v for k, v in rows.items() if k.startswith("cloud rolling"))["p99_ms"]
    ratio = round(upd / steady, 2) if steady and upd else None
    summary = {"scheduled": len(want), "records": len(recs), "answered": len(answered),
               "errors": len(errors), "shed": len(shed), "lost": len(lost), "degraded": degraded,
               "update_p99_over_steady_p99": ratio, "windows": rows,
               "error_messages": sorted({x["outcome"].get("detail", "") for x in errors}),
               "events": r["events"], "deploy_to_healthy_s": r["deploy_to_healthy_s"],
               "trace": f"{os.path.relpath(a.trace, REPO)} x{r['speed']:.2f}", "mode": a.mode,
               "image": a.image, "tasks": r["services"]}
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    md = [f"# swarm scenario ({summary['trace']}, mode {a.mode}, image {a.image})", "",
          f"{len(want)} scheduled: {len(answered)} answered ({degraded} degraded), "
          f"{len(errors)} explicit errors, {len(shed)} shed, **{len(lost)} lost**; "
          f"stack healthy {r['deploy_to_healthy_s']} s after deploy.", "",
          "| window | requests | answered | errors | degraded | p50 ms | p99 ms |",
          "|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.0f}"
    for k, v in rows.items():
        md.append(f"| {k} | {v['requests']} | {v['answered']} | {v['errors']} | {v['degraded']} | "
                  f"{fmt(v['p50_ms'])} | {fmt(v['p99_ms'])} |")
    md += ["", f"p99 during the cloud update / steady p99: {ratio}", "", "events (s after load start):"]
    md += [f"- {t}: {name}" for name, t, _ in r["events"]]
    for e in summary["error_messages"]:
        md.append(f"- error: {e}")
    text = "\n".join(md) + "\n"
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(text)
    print(text)
    if a.check:
        if lost or shed:
            print(f"check FAILED: {len(lost)} lost, {len(shed)} shed", file=sys.stderr)
            return 1
        # refused on purpose (4xx, e.g. 429 + Retry-After) is an answer; hung past the client
        # deadline, cut off, or failed by the server after admission (5xx) is not
        unanswered = [x for x in errors if not x["outcome"].get("detail", "").startswith("HTTP 4")]
        if unanswered:
            print(f"check FAILED: {len(unanswered)} requests hung, broken or failed by the server: "
                  + "; ".join(sorted({x['outcome'].get('detail', '')[:80] for x in unanswered})), file=sys.stderr)
            return 1
        if not answered:
            print("check FAILED: nothing answered", file=sys.stderr)
            return 1
        print(f"check passed: all {len(recs)} requests answered or failed explicitly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
