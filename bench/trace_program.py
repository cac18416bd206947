"""Where one program's time goes: its engine steps, one by one, beside the runner's compute floor.

    python bench/trace_program.py --workload judge [--programs 2] [--config configs/smollm2-135m-int8.yaml]
                                  [--data ../shared/workloads] [--set key=value ...] [--steps] [--keep-cache]

Runs the first `--programs` programs of a bench.programs workload one at a time on the in-process engine (cache
flushed before each unless `--keep-cache`, shapes warm), with a step listener. Per program it prints the wall
time, the floor as the runner prices it (uncached prompt tokens at the prefill rate + decode steps at the batch-1
step cost, both measured in this run by `measure_floor`), and the steps grouped by kind: decode-only steps by
their row count, and steps that carry prompt tokens with their tokens, shape and the page faults the process took
since the step before. Host time (schedule + postprocess) and the gaps between steps
(the frontend's own time, waits) are the rest of the wall time. `--steps` lists every step.
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step_row(info) -> dict:
    plan = info.plan
    prompt = sum(len(c.token_ids) for c in plan.prefills)
    sh = plan.shape
    return {"decode_rows": len(plan.decodes), "prefill_chunks": len(plan.prefills), "prompt_tokens": prompt,
            "shape": (sh.num_decode, sh.num_runs, sh.num_blocks, sh.page_width) if sh else None,
            "step_s": info.step_seconds, "device_s": info.device_seconds, "host_s": info.host_seconds,
            "t_end": time.perf_counter(), "minflt": resource.getrusage(resource.RUSAGE_SELF).ru_minflt}


def summarize(steps: list[dict], wall: float, floor_s: float) -> list[str]:
    out = []
    busy = sum(s["step_s"] + s["host_s"] for s in steps)
    out.append(f"  wall {wall:.3f} s, floor {floor_s:.3f} s ({wall / floor_s:.2f}x); steps {len(steps)}: step time "
               f"{sum(s['step_s'] for s in steps):.3f} s, host {sum(s['host_s'] for s in steps):.3f} s, "
               f"outside steps {wall - busy:.3f} s")
    dec = collections.defaultdict(list)
    for s in steps:
        if not s["prompt_tokens"]:
            dec[s["decode_rows"], s["shape"]].append(s)
    for (rows, shape), ss in sorted(dec.items()):
        ts = [s["step_s"] for s in ss]
        out.append(f"  decode {rows:2d} rows, shape {shape}: {len(ts):3d} steps, {sum(ts):.3f} s, median "
                   f"{1e3 * statistics.median(ts):.1f} ms (compiled step + fetch "
                   f"{1e3 * statistics.median(s['device_s'] for s in ss):.1f})")
    for prev, s in zip([None] + steps, steps):
        if s["prompt_tokens"]:
            faults = f", {s['minflt'] - prev['minflt']} page faults since the last step" if prev else ""
            out.append(f"  prompt step: {s['prompt_tokens']} tokens in {s['prefill_chunks']} chunk(s) + "
                       f"{s['decode_rows']} decode rows, shape (Sd, NR, NB, P) {s['shape']}: "
                       f"{1e3 * s['step_s']:.1f} ms{faults}")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="judge")
    ap.add_argument("--programs", type=int, default=2)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "smollm2-135m-int8.yaml"))
    ap.add_argument("--data", default=None, help="the workload data folder (default: bench.programs')")
    ap.add_argument("--set", action="append", default=[], help="config override key=value (as bench.programs)")
    ap.add_argument("--steps", action="store_true", help="list every step")
    ap.add_argument("--keep-cache", action="store_true",
                    help="no flush between programs: after the first, a workload's shared prefix (few-shot examples) "
                         "is cached, as in bench.programs' throughput runs")
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    import bench.programs as programs
    from bench.programs import common, runner
    from bench.programs.__main__ import parse_set

    overrides = parse_set(args.set)
    target = runner.EngineTarget(args.config, overrides)
    try:
        floor = runner.measure_floor(target)
        print(f"floor: prefill {floor['prefill_tok_s']:.0f} tok/s, batch-1 decode step "
              f"{1e3 * floor['decode_step_s']:.2f} ms, +{1e3 * floor['row_step_s']:.2f} ms a row past the first")
        mod, load_kw = programs.module(args.workload)
        items = mod.load(args.data or common.DEFAULT_DATA, args.programs, 0, False, **load_kw)
        prog = mod.build(target.lang, False)
        steps: list[dict] = []
        target.engine.add_step_listener(lambda info: steps.append(step_row(info)))
        for i, item in enumerate(items):
            if not args.keep_cache or i == 0:
                target.flush()
            steps.clear()
            before = target.step_counters()
            t0 = time.perf_counter()
            prog.run(backend=target.backend, temperature=0, **common.program_args(item)).sync()
            wall = time.perf_counter() - t0
            after = target.step_counters()
            floor_s, rows_s = runner.floor_seconds(floor, before, after)
            (p0, c0, d0, r0), (p1, c1, d1, r1) = before, after
            print(f"{args.workload} program {i}: {p1 - p0} prompt tokens ({c1 - c0} cached), {d1 - d0} decode steps "
                  f"({r1 - r0} rows); floor with steps priced by their rows {rows_s:.3f} s ({wall / rows_s:.2f}x)")
            print("\n".join(summarize(list(steps), wall, floor_s)))
            if args.steps:
                for s in steps:
                    print(f"    {s}")
    finally:
        target.close()


if __name__ == "__main__":
    main()
