"""The `s3` command line: one sub-command per pipeline stage. Commands are thin: parse, build a config, call."""

from __future__ import annotations

import sys

import click

from pipeline.config import ConfigError, load_config
from serve.policies import policy_needs
from serve.policy_config import POLICY_NAMES


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--local_rank", type=int, default=None, hidden=True, help="Set by the deepspeed launcher; ignored.")
def main(local_rank: int | None) -> None:
    """S3: predictive KV-memory scheduling for LLM inference.

    Stages: generate -> train -> serve / bench -> feedback -> train --feedback -> serve again.
    `simulate` runs the scheduler against a cost model at paper scale, with no GPU.
    """


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="YAML config (see configs/).")
@click.option("--preset", default=None,
              help="Model + hardware preset: paper (default), llama-2-13b-a100, llama-2-70b-8xa100, smollm2-cpu.")
@click.option("--policies", default=None,
              help="Comma-separated policies to compare, e.g. max,paged,s3,oracle (default: every policy).")
@click.option("--num-requests", type=int, default=None, help="Requests in the workload (default 10,000).")
@click.option("--mode", type=click.Choice(["offline", "online"]), default=None,
              help="All at t=0 (offline, the default), or Poisson arrivals.")
@click.option("--rate", type=float, default=None, help="Online arrival rate (requests/s; default 10).")
@click.option("--trace", default=None,
              help="JSONL/CSV length trace instead of the synthetic workload (repeated or cut to --num-requests).")
@click.option("--find-max-rate", is_flag=True, default=None,
              help="Also find each policy's largest rate within the SLO (searched from its offline capacity; "
                   "'>=' where no probe broke it).")
@click.option("--output-dir", default=None,
              help="Where report.json and simulate.png go (default runs/simulate; written after each policy).")
@click.option("--calibrate-from", type=click.Path(dir_okay=False), default=None,
              help="Fit the smollm2-cpu preset to an `s3 bench` bench.json and report the simulator's error "
                   "(writes runs/calibration/smollm2-cpu.json; simulates nothing, so takes no other option).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any config key (repeatable).")
def simulate(config_path, preset, policies, num_requests, mode, rate, trace, find_max_rate, output_dir, calibrate_from,
             overrides):
    """Run the scheduler against a roofline cost model: every policy on the same requests, in one run."""
    import pathlib

    from serve.sim.report import format_report, save_report
    from serve.sim.simulate import SimulateConfig, run_simulation
    from serve.sim.workload import WorkloadConfig

    if calibrate_from:
        from serve.sim.calibrate import MAX_STEP_ERROR, calibrate, format_calibration

        given = [name for name, value in [("--config", config_path), ("--preset", preset), ("--policies", policies),
                                          ("--num-requests", num_requests), ("--mode", mode), ("--rate", rate),
                                          ("--trace", trace), ("--find-max-rate", find_max_rate),
                                          ("--output-dir", output_dir), ("--set", overrides)] if value]
        if given:
            _fail(f"--calibrate-from fits the smollm2-cpu preset and simulates nothing: {', '.join(given)} would be "
                  "ignored; run it alone, then `s3 simulate --preset smollm2-cpu ...`")

        try:
            fit, rows = calibrate(calibrate_from)
        except (OSError, KeyError, ValueError, TypeError) as exc:
            _fail(f"cannot calibrate from {calibrate_from}: {exc}")
        click.echo(format_calibration(fit, rows))
        if rows[0]["held_out_step_error"] > MAX_STEP_ERROR:
            _fail(f"not written: the fit misses the held-out steps by {rows[0]['held_out_step_error']:.0%} on average "
                  f"(over {MAX_STEP_ERROR:.0%}); calibrate from a longer bench on a quiet machine")
        click.echo("wrote runs/calibration/smollm2-cpu.json (used by --preset smollm2-cpu from this folder)")
        return

    flags = {
        "preset": preset,
        "policies": policies and [p.strip() for p in policies.split(",") if p.strip()],
        "workload.num_requests": num_requests,
        "workload.mode": mode,
        "workload.rate": rate,
        "workload.trace": trace,
        "find_max_rate": find_max_rate,
        "output_dir": output_dir,
    }
    try:
        config = load_config(SimulateConfig, config_path, overrides, values=flags)
        if config.workload.mode != "online" and config.workload.rate != WorkloadConfig.rate:
            raise ValueError(f"an arrival rate ({config.workload.rate}/s) is set but the workload is offline: add "
                             "--mode online (this run would send everything at t=0)")
        pathlib.Path(config.output_dir).mkdir(parents=True, exist_ok=True)  # a bad folder fails now, not at the end
        report = run_simulation(config, progress=lambda msg: click.echo(msg, err=True),
                                save=lambda partial: save_report(partial, config.output_dir, complete=False))
        paths = save_report(report, config.output_dir)
    except (ConfigError, ValueError, OSError) as exc:
        _fail(str(exc))
    click.echo(format_report(report))
    click.echo(f"\nwrote {paths['json']} and {paths['png']}")


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="YAML config (see configs/).")
@click.option("--input", "inputs", multiple=True, help="Prompt file or datasets folder (repeatable; default: data/prompts/*).")
@click.option("--prompt-field", default=None, help="Field holding the prompt (default: instruction).")
@click.option("--model", default=None, help="smollm2 (default), a .gguf file or a Hugging Face folder.")
@click.option("--max-new-tokens", type=int, default=None,
              help="Cap on generated tokens (default 512; a predictor trained on these labels has buckets spanning it).")
@click.option("--limit-per-source", type=click.IntRange(min=1), default=None,
              help="Label a seeded random subset of N prompts per file.")
@click.option("--output-dir", default=None, help="Where shards, dataset, Parquet and card go (default data/labelled).")
@click.option("--write-only", is_flag=True, help="Write the dataset and card from the rows labelled so far; label nothing.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any config key (repeatable).")
def generate(config_path, inputs, prompt_field, model, max_new_tokens, limit_per_source, output_dir, write_only,
             overrides):
    """Label prompts with the target model's real output lengths (resumable)."""
    from pipeline.commands import label_and_save
    from pipeline.generate import GenerateConfig

    flags = {
        "inputs": list(inputs) or None, "prompt_field": prompt_field, "model": model,
        "max_new_tokens": max_new_tokens, "limit_per_source": limit_per_source, "output_dir": output_dir,
    }  # fmt: skip
    try:
        config = load_config(GenerateConfig, config_path, overrides, values=flags)
        label_and_save(config, echo=lambda msg: click.echo(msg, err=True), write_only=write_only)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def feedback(directory, as_json):
    """Summarise a misprediction feedback store (counts by bucket, under- and over-prediction, lines skipped)."""
    import json

    from serve.feedback import format_summary, summarize_store

    try:
        summary = summarize_store(directory)
    except FileNotFoundError as exc:
        _fail(str(exc))
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="YAML config (see configs/).")
@click.option("--model", default=None, help="smollm2 (default), a .gguf file or a Hugging Face folder.")
@click.option("--num-prompts", type=int, default=None, help="Prompts per policy (none labelled, none twice).")
@click.option("--max-new-tokens", type=int, default=None, help="Cap on generated tokens.")
@click.option("--policies", default=None, help="Comma-separated policies of the registry (max always runs first).")
@click.option("--predictor", default=None,
              help="Bucket predictor: oracle, noisy-oracle, constant, scalar-ratio, or a checkpoint folder.")
@click.option("--output-dir", default=None, help="Where bench.json and bench.png go.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any config key (repeatable).")
def bench(config_path, model, num_prompts, max_new_tokens, policies, predictor, output_dir, overrides):
    """Offline throughput and latency of the engine under each policy, side by side, plus a transformers reference."""
    from pipeline.bench import BenchConfig, run_bench
    from pipeline.bench_report import format_bench, save_bench

    flags = {
        "model": model, "num_prompts": num_prompts, "max_new_tokens": max_new_tokens, "predictor": predictor,
        "policies": policies and [p.strip() for p in policies.split(",") if p.strip()], "output_dir": output_dir,
    }  # fmt: skip
    try:
        config = load_config(BenchConfig, config_path, overrides, values=flags)
        report = run_bench(config, progress=lambda msg: click.echo(msg, err=True),
                           save=lambda partial: save_bench(partial, config.output_dir))
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    click.echo(format_bench(report))
    paths = save_bench(report, config.output_dir)
    click.echo(f"\nwrote {paths['json']} and {paths['png']}")


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default="configs/train_cpu.yaml",
              show_default=True, help="YAML config (see configs/): the recipe docs/predictor.md's figures were trained with.")
@click.option("--data", default="data/labelled", show_default=True, help="`s3 generate` output folder or a dataset.")
@click.option("--target-model", default=None, help="Model the lengths came from (read from the data's recipe.json).")
@click.option("--feedback", default=None, help="Feedback store to learn from (retraining; needs --from).")
@click.option("--from", "previous", default=None, help="Checkpoint to retrain from.")
@click.option("--output-dir", default=None, help="Where the best checkpoint goes.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any config key (repeatable).")
def train(config_path, data, target_model, feedback, previous, output_dir, overrides):
    """Fine-tune the length-bucket predictor with DeepSpeed, then evaluate it on the test split."""
    import logging

    from pipeline.commands import train_and_evaluate
    from predictor_train.train import TrainConfig

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = load_config(TrainConfig, config_path, overrides, values={"output_dir": output_dir})
        train_and_evaluate(config, data=data, target_model=target_model, feedback=feedback, previous=previous,
                           echo=click.echo)  # fmt: skip
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))


@main.command()
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("--data", default="data/labelled", show_default=True, help="`s3 generate` output folder or a dataset.")
@click.option("--split", type=click.Choice(["train", "validation", "test"]), default="test", show_default=True)
@click.option("--quantile", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Predict the bucket at this probability quantile.")
@click.option("--output-dir", default=None,
              help="Where the confusion matrix and reliability plot go (default: the checkpoint).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Prompts per predictor batch.")
@click.option("--exclude-source", "exclude_sources", multiple=True, metavar="SOURCE",
              help="Leave this source's rows out (repeatable), as `s3 train --set exclude_sources=[...]` does.")
@click.option("--neighbours", type=click.IntRange(min=0), default=0, show_default=True, metavar="K",
              help="Also score the K nearest training prompts in the untouched backbone's embedding as a baseline "
                   "(embeds the train split: about 2 minutes for 7,000 prompts on 2 CPU cores).")
def evaluate(checkpoint, data, split, quantile, output_dir, batch_size, exclude_sources, neighbours):
    """Evaluate a predictor checkpoint: per-source rows, baselines (majority bucket, prompt-length regression,
    per-source mean; with --neighbours, the nearest training prompts), NLL, calibration error and quantile
    coverage, the prompts the predictor finds unfamiliar apart from the rest; confusion and reliability plots."""
    from pipeline.labelled import labelled_data
    from predictor_train.checkpoint import read_info
    from predictor_train.data import load_records
    from predictor_train.evaluate import evaluate_checkpoint

    try:
        dataset, recipe = labelled_data(data)
        info = read_info(checkpoint)
        if recipe.get("model", info.target_model) != info.target_model:
            click.echo(f"warning: {data} was labelled by {recipe['model']}, the checkpoint predicts lengths of "
                       f"{info.target_model}'s answers", err=True)
        if recipe.get("max_new_tokens", info.buckets.max_tokens) != info.buckets.max_tokens:
            click.echo(f"warning: {data} was labelled with max_new_tokens={recipe['max_new_tokens']}, the "
                       f"checkpoint's buckets span {info.buckets.max_tokens} tokens", err=True)
        dataset = load_records(dataset)
        over = sum(int(n) > info.buckets.max_tokens for n in dataset["num_output_tokens"])
        if over:
            click.echo(f"warning: {over} of the {len(dataset)} labels are longer than the checkpoint's buckets "
                       f"({info.buckets.max_tokens} tokens): they are scored as the last bucket", err=True)
        report = evaluate_checkpoint(checkpoint, dataset, split=split, out_dir=output_dir or checkpoint,
                                     quantile=quantile, batch_size=batch_size, exclude_sources=exclude_sources,
                                     neighbours=neighbours)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    click.echo(f"{split} split:\n{report.table}\nconfusion matrix: {report.confusion_png}\n"
               f"reliability: {report.reliability_png}")


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default="configs/serve_cpu.yaml",
              show_default=True, help="YAML config (see configs/).")
@click.option("--policy", type=click.Choice(POLICY_NAMES), default=None,
              help="Admission policy (s3: predictive paged scheduling; s3-reserve: the paper's reservations).")
@click.option("--predictor", default=None, help="Length-predictor checkpoint (the output of `s3 train`).")
@click.option("--fallback-policy", type=click.Choice([p for p in POLICY_NAMES if policy_needs(p) == "none"]),
              default=None,
              help="With s3 and no usable predictor, serve with this policy instead of refusing to start.")
@click.option("--host", default=None, help="Address to bind (default 127.0.0.1).")
@click.option("--port", type=int, default=None)
@click.option("--api-key", default=None, help="Require this bearer key (default: env S3_API_KEY).")
@click.option("--allow-insecure-no-auth", is_flag=True, default=None,
              help="Serve a non-loopback --host without an API key (anyone who can reach the port can use it).")
@click.option("--tensor-parallel", type=int, default=None, help="Ranks (launch that many with the deepspeed launcher).")
@click.option("--enable-prefix-caching/--no-enable-prefix-caching", default=None,
              help="Share the KV cache of prompts that begin alike (default: the config's engine.enable_prefix_caching).")
@click.option("--priority-scheduling/--no-priority-scheduling", default=None,
              help="Let requests carry a priority (lower first; default: the config's priority_scheduling, off).")
@click.option("--ssl-certfile", default=None, help="Serve HTTPS with this certificate (PEM; with --ssl-keyfile).")
@click.option("--ssl-keyfile", default=None, help="The certificate's private key (PEM).")
@click.option("--allowed-origins", multiple=True, metavar="ORIGIN",
              help="A web origin whose pages may call the API from a browser (CORS; repeatable; * for any).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any config key (repeatable).")
def serve(config_path, policy, predictor, fallback_policy, host, port, api_key, allow_insecure_no_auth,
          tensor_parallel, enable_prefix_caching, priority_scheduling, ssl_certfile, ssl_keyfile, allowed_origins,
          overrides):
    """OpenAI-compatible server with the predictive admission controller and the feedback stream."""
    from serve.server.config import ServeConfig
    from serve.server.launch import EngineFailed, serve_main

    flags = {
        "engine.policy.policy": policy, "predictor": predictor, "fallback_policy": fallback_policy, "host": host,
        "port": port, "api_key": api_key, "allow_insecure_no_auth": allow_insecure_no_auth,
        "engine.tensor_parallel": tensor_parallel, "engine.enable_prefix_caching": enable_prefix_caching,
        "priority_scheduling": priority_scheduling, "ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile,
        "allowed_origins": allowed_origins or None,
    }  # fmt: skip
    try:
        config = load_config(ServeConfig, config_path, overrides, values=flags)
        serve_main(config, load_checkpoint=load_predictor_checkpoint)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    except EngineFailed as exc:  # logged with its traceback; exit non-zero for a supervisor to restart the server
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


@main.command()
@click.argument("input_path", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output_path", required=True, type=click.Path(dir_okay=False),
              help="Answers, one JSON line per request (appended; requests it already answers are skipped).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default="configs/serve_cpu.yaml",
              show_default=True, help="YAML config (see configs/).")
@click.option("--policy", type=click.Choice(POLICY_NAMES), default=None, help="Admission policy.")
@click.option("--predictor", default=None, help="Length-predictor checkpoint (the output of `s3 train`).")
@click.option("--fallback-policy", type=click.Choice([p for p in POLICY_NAMES if policy_needs(p) == "none"]),
              default=None, help="With s3 and no usable predictor, use this policy instead of refusing to start.")
@click.option("--enable-prefix-caching/--no-enable-prefix-caching", default=None,
              help="Share the KV cache of prompts that begin alike (default: the config's engine.enable_prefix_caching).")
@click.option("--priority-scheduling/--no-priority-scheduling", default=True, show_default=True,
              help="Let requests carry a priority (lower first): on by default, the file being the operator's own.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any config key (repeatable).")
def batch(input_path, output_path, config_path, policy, predictor, fallback_policy, enable_prefix_caching,
          priority_scheduling, overrides):
    """Answer a file of OpenAI Batch API requests offline (as `vllm run-batch`), scheduled as `s3 serve` would."""
    from serve.server.batch import check_paths, keep_final_answers, output_lock, read_batch, run_batch
    from serve.server.config import ServeConfig
    from serve.server.launch import build_stack, configure_process

    flags = {"engine.policy.policy": policy, "predictor": predictor, "fallback_policy": fallback_policy,
             "engine.enable_prefix_caching": enable_prefix_caching, "priority_scheduling": priority_scheduling}
    try:
        config = load_config(ServeConfig, config_path, overrides, values=flags)
        read_batch(input_path)  # a bad file fails before the model loads, as does a bad output file
        check_paths(input_path, output_path)
        with output_lock(output_path):
            keep_final_answers(output_path)
            configure_process(config)
            summary = run_batch(build_stack(config, load_checkpoint=load_predictor_checkpoint), input_path,
                                output_path, locked=True)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    rate = summary.num_completion_tokens / summary.elapsed_s if summary.elapsed_s else 0.0
    click.echo(f"{summary.num_ok} answered, {summary.num_failed} failed, {summary.num_skipped} already in "
               f"{output_path}; {summary.num_completion_tokens} tokens in {summary.elapsed_s:.1f} s ({rate:.1f} "
               f"tokens/s)")
    for message, count in summary.errors.most_common(3):
        click.echo(f"  failed {count}x: {message}")
    if summary.predictions:
        click.echo(f"length predictor: {summary.predictions}")
    if summary.num_retriable:  # a script can tell that a rerun is due
        click.echo(f"error: {summary.num_retriable} requests failed for the server's reasons (5xx, 429); run the "
                   "same command again to retry them", err=True)
        raise SystemExit(1)


def load_predictor_checkpoint(path: str):
    """`s3 serve`'s checkpoint loader (torch and transformers are imported only when a checkpoint is loaded)."""
    from predictor_train.inference import LengthPredictor

    return LengthPredictor.load(path)


@main.group()
def pipeline() -> None:
    """The whole loop: generate -> train -> collect (serve, mispredictions) -> retrain -> bench."""


@pipeline.command("run")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default="configs/pipeline_cpu.yaml",
              show_default=True, help="YAML config (see configs/).")
@click.option("--from", "start", default=None, help="Run from this stage on, even if up to date.")
@click.option("--only", default=None, help="Run only this stage (the others must have run).")
@click.option("--run-id", default=None, help="Folder under runs/ and wandb group (default from the config).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any config key (repeatable).")
def pipeline_run(config_path, start, only, run_id, overrides):
    """Run generate -> train -> collect -> retrain -> bench, skipping stages whose inputs are unchanged."""
    import logging

    from pipeline.run import Pipeline, PipelineConfig
    from pipeline.summary import format_summary, log_summary, serve_command

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = load_config(PipelineConfig, config_path, overrides, values={"run_id": run_id})
        runner = Pipeline(config, echo=click.echo)
        outputs = runner.run(start=start, only=only)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    if runner.stale:  # a before/after table would mix rounds of different inputs
        click.echo(f"no summary: {', '.join(runner.stale)} kept results of other inputs; run without --from/--only "
                   "to bring every stage up to date")
    elif all(stage in outputs for stage in ("train", "collect", "bench")):
        click.echo("\n" + format_summary(outputs))
        log_summary(config, outputs)
        click.echo(f"\nserve its predictor: {serve_command(outputs)}")


if __name__ == "__main__":
    main()
