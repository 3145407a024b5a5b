"""What request priorities buy under overload, in the simulator: a share of urgent requests among ordinary ones.

A service that takes interactive requests beside bulk ones marks the interactive ones urgent (vLLM's `priority`,
lower first; `s3 serve --priority-scheduling`). Here a share `--urgent-share` of the requests, drawn at random, are
urgent (priority -1), the rest 0. Each policy runs the same Poisson arrivals at `--load` times `paged`'s offline
capacity (measured first, on the same workload sent all at once) twice: ignoring the priorities, then honouring them.
Per run and per class: time to first token mean / p50 / p99 and end-to-end latency mean / p50 / p99.

    .venv/bin/python benchmarks/priority_sim.py --output runs/priority_sim.json

Writes JSON with a `results` list (the simulator's per-policy keys, plus `priorities` and `classes`: the same
latency keys for `urgent` and `normal`) and prints the table. Not collected by pytest; about a minute.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from core.files import output_file  # noqa: E402
from core.records import json_text  # noqa: E402
from serve.sim.runner import latency_summary, requests_of, simulate_policy  # noqa: E402
from serve.sim.simulate import SimulateConfig, setup, workload_items  # noqa: E402
from serve.sim.workload import WorkloadConfig  # noqa: E402

LATENCY_KEYS = ("mean_ttft_s", "p50_ttft_s", "p99_ttft_s", "mean_latency_s", "p50_latency_s", "p99_latency_s")


def run(config: SimulateConfig, policy: str, items, urgent: set[int], honour: bool) -> dict:
    """One policy over ``items`` (online; the ``urgent`` indices at priority -1), their priorities dropped unless
    ``honour``."""
    cost, buckets, sched = setup(config)
    requests = requests_of(items, cost.model.max_seq_len, config.max_new_tokens)
    if not honour:
        for request in requests:
            request.priority = 0
    result = simulate_policy(policy, items, cost=cost, buckets=buckets, sched=sched,
                             max_new_tokens=config.max_new_tokens, requests=requests)
    record = {key: getattr(result, key) for key in ("policy", "generated_tokens_per_s", *LATENCY_KEYS,
                                                    "num_preemptions", "num_recomputed_tokens")}
    record["priorities"] = honour
    record["classes"] = {
        "urgent": latency_summary([r for i, r in enumerate(requests) if i in urgent]),
        "normal": latency_summary([r for i, r in enumerate(requests) if i not in urgent]),
    }
    return record


@click.command()
@click.option("--preset", default="llama-2-13b-a100", show_default=True)
@click.option("--policies", default="paged,s3", show_default=True)
@click.option("--num-requests", default=3000, show_default=True)
@click.option("--load", default=1.5, show_default=True, help="Arrival rate as a multiple of paged's offline capacity.")
@click.option("--urgent-share", default=0.2, show_default=True)
@click.option("--max-new-tokens", default=1024, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--output", type=click.Path(dir_okay=False), default="runs/priority_sim.json", show_default=True)
def main(preset, policies, num_requests, load, urgent_share, max_new_tokens, seed, output):
    try:  # the policies and the output path are checked before the first simulation
        config = SimulateConfig(preset=preset, max_new_tokens=max_new_tokens, policies=tuple(policies.split(",")),
                                workload=WorkloadConfig(num_requests=num_requests, seed=seed))
        path = output_file(output)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    cost, buckets, sched = setup(config)
    offline = simulate_policy("paged", workload_items(config, config.workload, cost, buckets), cost=cost,
                              buckets=buckets, sched=sched, max_new_tokens=max_new_tokens)
    rate = load * offline.requests_per_s
    online = dataclasses.replace(config.workload, mode="online", rate=rate, urgent_share=urgent_share)
    items = workload_items(config, online, cost, buckets)
    urgent = {i for i, item in enumerate(items) if item.priority < 0}
    click.echo(f"{preset}: paged's offline capacity {offline.requests_per_s:.2f} requests/s; online at {rate:.2f} "
               f"({load}x), {len(items)} requests, {len(urgent)} urgent", err=True)
    results = [run(config, policy, items, urgent, honour)
               for policy in config.policies for honour in (False, True)]
    click.echo("| policy | priorities | class | TTFT mean / p99 s | latency mean / p99 s | tokens/s | preemptions |")
    click.echo("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for record in results:
        for name in ("urgent", "normal"):
            c = record["classes"][name]
            click.echo(f"| {record['policy']} | {'on' if record['priorities'] else 'off'} | {name} | "
                       f"{c['mean_ttft_s']:.2f} / {c['p99_ttft_s']:.2f} | {c['mean_latency_s']:.2f} / "
                       f"{c['p99_latency_s']:.2f} | {record['generated_tokens_per_s']:.0f} | "
                       f"{record['num_preemptions']} |")
    path.write_text(json_text({"preset": preset, "load": load, "rate": rate, "urgent_share": urgent_share,
                                "num_requests": len(items), "seed": seed, "results": results}, indent=2))
    click.echo(f"wrote {path}", err=True)


if __name__ == "__main__":
    main()
