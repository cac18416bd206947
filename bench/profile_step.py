"""Where does a forward step's time go? jax.profiler trace of the jitted forward, grouped by role.

    python bench/profile_step.py [--batch 32] [--ctx 512] [--prefill N [--prefill-at M] [--chunks C]] [--steps 5]
                                 [--dtype float32] [--attention jnp|...] [--attention-math bfloat16] [--quant int8]
                                 [--kv-dtype float16] [--shared-prefix N]

Runs the forward as bench_model.py does, traces `--steps` calls with jax.profiler, and sums the duration
of every XLA:CPU op (thunk) event, attributing each top-level HLO instruction to a role through its
`op_name` metadata (the Flax module path and jnp op that produced it): page gather, QK dot, PV dot,
softmax/mask, KV write (scatter), q/k/v/o projections, MLP, norms, RoPE, embedding/LM head.
Op times are summed over the executor's threads (independent ops run concurrently on the 2 cores, and
one op may itself be split over both), so a role's share is of summed op time, not of wall time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import math
import os
import re
import shutil
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))

ROLES = [  # (role, regex on op_name or fused-body text), first match wins
    ("attn: page gather", r"/gather\b|gather\("),
    ("attn: QK dot", r"RQKGD,RPKSD->RKGQPS|RKGD,RKCD->RKGC|RQKGD,RKCD->RKGQC|RKGD,RKDC->RKGC|RQKGD,RPKDS"),
    ("attn: PV dot", r"RKGQPS,RPKSD->RQKGD|RKGC,RKCD->RKGD|RKGQC,RKCD->RQKGD"),
    ("KV write (scatter)", r"scatter"),
    ("MLP dots", r"mlp/\w+_proj/dot_general"),
    ("attn: q/k/v/o proj", r"_proj/dot_general"),
    ("attn: RoPE", r"self_attn/(sin|cos)|self_attn/concatenate"),
    ("attn: softmax+mask", r"self_attn/"),
    ("MLP (excl. dots)", r"/mlp/"),
    ("norms", r"layernorm|/norm/"),
    ("embed + LM head", r"embed_tokens|LE,VE->LV|LE,EV->LV"),
]


def classify(op_name: str, body: str) -> str:
    for role, pat in ROLES:
        if re.search(pat, op_name):
            return role
    if re.search(ROLES[0][1], body):
        return ROLES[0][0]
    return "other"


def ffi_role(target: str, op_name: str) -> str:
    if "attention" in target:
        return "attn: native kernel"
    if "/mlp/" in op_name:
        return "MLP matmuls (native)"
    if "self_attn" in op_name:
        return "q/k/v/o matmuls (native)"
    return "embed + LM head" if re.search(r"embed|lm_head|LE,", op_name) or "/" not in op_name else "other native"


def computations(hlo: str) -> dict[str, str]:
    """The HLO module's computations (fusion bodies) by name: '%name' -> their text."""
    return {m.group(1): m.group(2) for m in re.finditer(r"\n(%[\w.\-]+) \([^\n]*\{\n(.*?)\n\}", hlo, re.S)}


def instruction_roles(hlo: str) -> dict[str, str]:
    comps = computations(hlo)
    entry = hlo[hlo.index("\nENTRY"):]
    roles = {}
    for line in entry.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = ", line)
        if not m:
            continue
        op = re.search(r'op_name="([^"]*)"', line)
        calls = re.search(r"calls=(%[\w.\-]+)", line)
        body = comps.get(calls.group(1), "") if calls else ""
        op_name = op.group(1) if op else ""
        target = re.search(r'custom_call_target="(sgl_jax_\w+)"', line)
        if target:  # our native kernels: the attention kernel, or a matmul named by the module that called it
            roles[m.group(1)] = ffi_role(target.group(1), op_name)
            continue
        # ynn/dot fusions: name the dot by its einsum; gathers fused into copies by their body
        if " gather(" in body and re.search(r"/gather|where|transpose|select", op_name + " "):
            roles[m.group(1)] = "attn: page gather"
            continue
        if " dot(" in body and not re.search(r"dot_general", op_name):
            dm = re.search(r'dot\([^\n]*op_name="([^"]*)"', body)
            op_name = dm.group(1) if dm else op_name
        roles[m.group(1)] = classify(op_name, body)
    return roles


def main(argv=None):
    """The command line, the traced steps and the printed breakdown (see the module docstring); long because it
    is the script's whole run, one step after another."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--prefill", type=int, default=0)
    ap.add_argument("--prefill-at", type=int, default=0,
                    help="the prefill chunk's first position: a chunk after that many cached tokens")
    ap.add_argument("--chunks", type=int, default=1, help="prefill chunks, each after the same --prefill-at tokens")
    ap.add_argument("--block-q", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--attention", default="auto", help="as bench_model.py's (auto: what the engine runs)")
    ap.add_argument("--quant", default="none", choices=["none", "int8", "gguf"], help="weight quantization")
    ap.add_argument("--kv-dtype", default="", help="the KV pool's dtype (default: --dtype)")
    ap.add_argument("--attention-math", default="float32", help="the engine's attention_math: float32 | bfloat16")
    ap.add_argument("--shared-prefix", type=int, default=0,
                    help="decode: the rows share the pages of their first N tokens (a fork's branches)")
    ap.add_argument("--top", type=int, default=8, help="list this many most expensive ops")
    ap.add_argument("--role", default="", help="list only ops of roles containing this text (with their HLO)")
    args = ap.parse_args(argv)
    sys.path.insert(0, HERE)
    import jax
    import jax.numpy as jnp

    import bench_model as bm
    S = bm.PAGE_SIZE
    if args.prefill:
        # --chunks chunks of --prefill tokens, each after the same --prefill-at cached tokens (a fork's branches):
        # the whole pages of that prefix are shared, each chunk has its own pages from there on
        at, n = args.prefill_at, args.chunks
        mb = bm.ModelBench(args.dtype, 1 + bm.ModelBench.prefill_pages(args.prefill, at, n), args.attention,
                           args.quant, kv_dtype=args.kv_dtype or None, attention_math=args.attention_math)
        b = mb.prefill_batch(args.prefill, args.block_q, at, chunks=n)
        what = (f"prefill {n} x " if n > 1 else "prefill ") + str(args.prefill) + \
            (f" after {at} cached" if at else "") + f" block_q={args.block_q}"
    else:
        pp = math.ceil(args.ctx / S)
        mb = bm.ModelBench(args.dtype, 1 + args.batch * pp, args.attention, args.quant, kv_dtype=args.kv_dtype or None,
                           attention_math=args.attention_math)
        shared = args.shared_prefix // S  # whole pages every row shares (a fork's prefix), then each row's own
        b = mb.decode_batch(args.batch, args.ctx, args.shared_prefix)
        what = f"decode B={args.batch} ctx={args.ctx}" + (f" (first {shared * S} shared)" if shared else "")
    meta = tuple(jnp.asarray(m) for m in (b.positions, b.slot_mapping, b.dec_page_table, b.dec_kv_lens,
                                          b.pre_page_table, b.pre_kv_lens))
    ids_, li = jnp.asarray(b.input_ids), jnp.asarray(b.logits_indices)
    from sgl_jax.executables import step_compile_options

    compiled = mb.fwd.lower(mb.params, ids_, mb.kv, li, meta, block_q=b.block_q).compile(
        compiler_options=step_compile_options(len(b.input_ids)))  # the runner's options
    hlo = compiled.as_text()
    roles = instruction_roles(hlo)

    def run():
        logits, mb.kv = compiled(mb.params, ids_, mb.kv, li, meta)
        logits.block_until_ready()

    for _ in range(3):
        run()
    walls = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        run()
        walls.append(time.perf_counter() - t0)
    d = tempfile.mkdtemp(prefix="sgl_jax_prof_")
    with jax.profiler.trace(d):
        for _ in range(args.steps):
            run()
    path = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
    pd = jax.profiler.ProfileData.from_file(path)
    per_role = collections.defaultdict(float)
    per_op = collections.defaultdict(float)
    for plane in pd.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for ev in line.events:
                if ev.name.startswith("ThunkExecutor"):
                    continue
                per_role[roles.get(ev.name, "other")] += ev.duration_ns
                per_op[ev.name] += ev.duration_ns
    shutil.rmtree(d, ignore_errors=True)
    total = sum(per_role.values())
    wall = sorted(walls)[len(walls) // 2]
    print(f"{what}, {args.dtype}, attention={args.attention}: wall {1e3 * wall:.1f} ms/step (median of "
          f"{args.steps}, untraced); summed op time {total / 1e6 / args.steps:.1f} ms/step")
    for role, ns in sorted(per_role.items(), key=lambda x: -x[1]):
        print(f"  {role:<22} {ns / 1e6 / args.steps:8.2f} ms  {ns / total:6.1%}")
    print("  top ops (ms/step, role):")
    listed = [(k, v) for k, v in per_op.items() if args.role in roles.get(k, "other")]
    comps = computations(hlo) if args.role else {}
    for k, v in sorted(listed, key=lambda x: -x[1])[:args.top]:
        shape = re.search(rf"%{re.escape(k)} = (\S+)", hlo)
        print(f"    {v / 1e6 / args.steps:6.2f}  {k:<32} {shape.group(1) if shape else '':<28} {roles.get(k, 'other')}")
        if args.role:  # the op's fused body (or its own line)
            line = re.search(rf"\n\s*(?:ROOT )?%{re.escape(k)} = [^\n]*", hlo)
            calls = re.search(r"calls=(%[\w.\-]+)", line.group(0)) if line else None
            text = comps.get(calls.group(1), "") if calls else (line.group(0) if line else "")
            print(re.sub(r", metadata=\{[^}]*\}", "", text))
    mb.close()


if __name__ == "__main__":
    main()
