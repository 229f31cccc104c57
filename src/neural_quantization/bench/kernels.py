"""Kernel benchmark: our quantized matmul vs dense cuBLAS and PyTorch's int4 kernel (tinygemm).

Protocol (``BENCHMARKS.md``, speed section): Mistral-7B layer shapes (K→N) qkv 4096→6144,
o 4096→4096, gate_up 4096→28672, down 14336→4096; M = 1 … 64; fp16 and bf16 activations; group 128.
For each (shape, M, dtype):

* ``dense``: ``F.linear(x, W)`` with W in the activation dtype (cuBLAS);
* ``ours``: ``ops.prepared_plan`` (the call path ``QuantLinear`` takes outside ``torch.compile``,
  with the stored choice of each (shape, M), tuned on the spot before timing where none is stored; under ``torch.compile`` the custom op launches the same kernels);
* ``tinygemm``: ``torch.ops.aten._weight_int4pack_mm`` (bf16 activations, group 128).

Times are per call, in µs: ``graph`` = ``graph_calls`` calls captured in one CUDA graph, replayed,
timed with CUDA events and divided (median of ``repeats`` replays); ``eager`` = the same calls
launched from Python. Each method cycles through enough copies of its weights that together they
exceed the L2 cache (as in a real decode step, where every layer's weights come from DRAM).
``ours_GBps`` is the int4 bytes (codes + fp16 scales + packed zeros) over the graph time.
Weights are random codes (speed does not depend on values); each configuration is also checked
against ``kernels/reference.py`` and the relative error is recorded.

Entry points: :func:`run_kernel_benchmark` (returns the result dict, optionally writes JSON) and
:func:`main` (``neural-quantize bench`` command line).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
from collections.abc import Callable, Sequence

import torch

from neural_quantization.formats.packing import pack
from neural_quantization.kernels import ops
from neural_quantization.kernels.reference import quant_linear_reference
from neural_quantization.kernels.timing import median_event_us, time_in_graph

MISTRAL_7B_SHAPES: dict[str, tuple[int, int]] = {
    "qkv": (4096, 6144),
    "o": (4096, 4096),
    "gate_up": (4096, 28672),
    "down": (14336, 4096),
}
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
_L2_FLUSH_BYTES = 160 * 1024 * 1024  # rotate weights through more than the 50 MB L2 of an H100


def environment() -> dict:
    """Device and software versions for result files."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    return info


def random_gptq_layer(in_features: int, out_features: int, bits: int, group_size: int, sym: bool,
                      device: str | torch.device, generator: torch.Generator | None = None) -> dict:
    """GPTQ tensors of a random layer, built on ``device`` (random codes, scales ~ 1e-2, zeros)."""
    per_group = in_features if group_size == -1 else group_size
    groups = math.ceil(in_features / per_group)
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (in_features, out_features), device=device, dtype=torch.int32,
                          generator=generator)
    if sym:
        zeros = torch.full((groups, out_features), 1 << (bits - 1), device=device, dtype=torch.int32)
    else:
        zeros = torch.randint(1, maxq + 1, (groups, out_features), device=device, dtype=torch.int32,
                              generator=generator)
    scales = (torch.rand(groups, out_features, device=device, generator=generator) * 0.02 + 0.001).half()
    return {
        "qweight": pack(codes, bits, dim=0),
        "qzeros": pack(zeros - 1, bits, dim=1),
        "scales": scales,
        "g_idx": (torch.arange(in_features, device=device, dtype=torch.int32) // per_group),
    }


def time_graph(fns: Sequence[Callable[[], object]], calls: int, repeats: int) -> float:
    """µs per call: ``calls`` calls (cycling through ``fns``) in one CUDA graph, median of replays."""
    return time_in_graph(fns, calls, repeats, warmup_replays=2)


def time_eager(fns: Sequence[Callable[[], object]], calls: int, repeats: int) -> float:
    """µs per call of ``calls`` eager launches (cycling through ``fns``), median over repeats."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()

    def launch_all() -> None:
        for i in range(calls):
            fns[i % len(fns)]()

    return median_event_us(launch_all, repeats) / calls


def _copies(bytes_per_copy: int, calls: int) -> int:
    return max(2, min(calls, math.ceil(_L2_FLUSH_BYTES / max(bytes_per_copy, 1))))


def _tinygemm_layer(in_features: int, out_features: int, group_size: int, device) -> tuple | None:
    """(packed weight, scales_and_zeros) for ``_weight_int4pack_mm``, or None where it is missing."""
    try:
        raw = torch.randint(0, 256, (out_features, in_features // 2), dtype=torch.uint8, device=device)
        packed = torch.ops.aten._convert_weight_to_int4pack(raw, 8)
        scales_zeros = torch.rand(in_features // group_size, out_features, 2, device=device).to(torch.bfloat16)
        return packed, scales_zeros
    except (RuntimeError, AttributeError):
        return None


def _plans(layers: list[dict], layouts: list, bits: int, in_features: int) -> list:
    """The call path QuantLinear uses outside torch.compile (``kernels.ops.prepared_plan``), per copy."""
    return [ops.prepared_plan(lay.qweight, t["qzeros"], t["scales"], lay.perm, None, bits, lay.group_size,
                              in_features, lay.symmetric) for t, lay in zip(layers, layouts)]


def run_kernel_benchmark(
    shapes: dict[str, tuple[int, int]] | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    dtypes: Sequence[str] = ("float16", "bfloat16"),
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    repeats: int = 7,
    graph_calls: int = 20,
    tinygemm: bool = True,
    output: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the kernel benchmark on the current CUDA device; returns (and optionally writes) results.

    Returns ``{"environment", "settings", "results": [row per (shape, dtype, M)], "summary":
    [row per (dtype, M) summed over shapes], "tuning": [tuning log]}``.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("the kernel benchmark needs a CUDA device")
    from neural_quantization.kernels import dispatch

    shapes = dict(MISTRAL_7B_SHAPES if shapes is None else shapes)
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name, (in_features, out_features) in shapes.items():
        q_bytes = ops.weight_bytes(in_features, out_features, bits, group_size)
        n_q = _copies(q_bytes, graph_calls)
        layers = [random_gptq_layer(in_features, out_features, bits, group_size, sym, device, generator)
                  for _ in range(n_q)]
        layouts = [ops.prepare(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, in_features)
                   for t in layers]
        plans = _plans(layers, layouts, bits, in_features)
        n_dense = _copies(2 * in_features * out_features, graph_calls)
        tiny = None
        if tinygemm and bits == 4 and group_size > 0:
            tiny = [_tinygemm_layer(in_features, out_features, group_size, device)
                    for _ in range(_copies(q_bytes, graph_calls))]
            tiny = None if any(t is None for t in tiny) else tiny
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            dense = [torch.randn(out_features, in_features, device=device, dtype=dtype, generator=generator) * 0.02
                     for _ in range(n_dense)]
            for m in batch_sizes:
                x = torch.randn(m, in_features, device=device, dtype=dtype, generator=generator)

                def ours(i, x=x, plans=plans):
                    return plans[i](x)

                with dispatch.tuning_on_the_spot():  # tunes a missing (M bucket, K, N, dtype) before any capture
                    out = ours(0)
                for plan in plans[1:]:
                    plan(x)  # resolve every copy's launcher before capture
                ref = quant_linear_reference(x.float(), layers[0]["qweight"], layers[0]["qzeros"],
                                             layers[0]["scales"], layers[0]["g_idx"], None, bits, in_features)
                rel_err = float((out.float() - ref).norm() / ref.norm())
                ours_fns = [lambda i=i: ours(i) for i in range(n_q)]
                dense_fns = [lambda w=w, x=x: torch.nn.functional.linear(x, w) for w in dense]
                row = {
                    "shape": name, "K": in_features, "N": out_features, "M": m, "dtype": dtype_name,
                    "bits": bits, "group_size": group_size, "sym": sym,
                    "dense_graph_us": time_graph(dense_fns, graph_calls, repeats),
                    "dense_eager_us": time_eager(dense_fns, graph_calls, repeats),
                    "ours_graph_us": time_graph(ours_fns, graph_calls, repeats),
                    "ours_eager_us": time_eager(ours_fns, graph_calls, repeats),
                    "ours_config": plans[0].config_for(x).describe(),
                    "ours_launch": plans[0].direct_status,
                    "ours_rel_err_vs_reference": rel_err,
                    "weight_bytes_int": q_bytes,
                    "weight_bytes_dense": 2 * in_features * out_features,
                }
                if tiny is not None and dtype == torch.bfloat16:
                    tiny_fns = [lambda p=p, x=x: torch.ops.aten._weight_int4pack_mm(x, p[0], group_size, p[1])
                                for p in tiny]
                    try:
                        row["tinygemm_graph_us"] = time_graph(tiny_fns, graph_calls, repeats)
                        row["tinygemm_eager_us"] = time_eager(tiny_fns, graph_calls, repeats)
                    except RuntimeError as error:
                        row["tinygemm_error"] = str(error)[:200]
                # the tensor-core kernel runs as a programmatic dependent launch (it prefetches its codes
                # while the kernel before it ends; here that kernel is the previous call): time it
                # without as well, which is what a kernel after a non-PDL kernel gets at most
                row["ours_nopdl_graph_us"] = row["ours_graph_us"]
                if row["ours_config"].startswith("cuda_mma"):
                    previous = os.environ.get("NQ_PDL")
                    os.environ["NQ_PDL"] = "0"
                    try:
                        nopdl = _plans(layers, layouts, bits, in_features)
                        for plan in nopdl:
                            plan(x)
                        row["ours_nopdl_graph_us"] = time_graph([lambda p=p, x=x: p(x) for p in nopdl], graph_calls,
                                                                repeats)
                    finally:
                        os.environ.pop("NQ_PDL") if previous is None else os.environ.update(NQ_PDL=previous)
                    del nopdl
                row["ratio_graph"] = row["dense_graph_us"] / row["ours_graph_us"]
                row["ratio_graph_nopdl"] = row["dense_graph_us"] / row["ours_nopdl_graph_us"]
                row["ratio_eager"] = row["dense_eager_us"] / row["ours_eager_us"]
                row["ours_GBps"] = q_bytes / row["ours_graph_us"] / 1e3
                row["dense_GBps"] = row["weight_bytes_dense"] / row["dense_graph_us"] / 1e3
                if "tinygemm_graph_us" in row:
                    row["tinygemm_ratio_graph"] = row["dense_graph_us"] / row["tinygemm_graph_us"]
                rows.append(row)
                log(f"{name:8s} {dtype_name:8s} M={m:<3d} dense {row['dense_graph_us']:7.1f} us  "
                    f"ours {row['ours_graph_us']:7.1f} us ({row['ratio_graph']:.2f}x, {row['ours_GBps']:.0f} GB/s) "
                    f"no-PDL {row['ours_nopdl_graph_us']:6.1f} eager {row['ours_eager_us']:6.1f} ({row['ours_launch'][:40]})  {row['ours_config']}  err {rel_err:.1e}"
                    + (f"  tinygemm {row['tinygemm_graph_us']:.1f}" if "tinygemm_graph_us" in row else ""))
            del dense
        del layers, layouts, tiny, plans
        torch.cuda.empty_cache()
        if output:  # partial results survive an interrupted run
            with open(output, "w") as handle:
                json.dump({"partial": True, "results": rows, "tuning": dispatch.TUNING_LOG}, handle)
    result = {
        "environment": environment(),
        "settings": {"shapes": shapes, "batch_sizes": list(batch_sizes), "dtypes": list(dtypes), "bits": bits,
                     "group_size": group_size, "sym": sym, "repeats": repeats, "graph_calls": graph_calls,
                     "l2_rotation_bytes": _L2_FLUSH_BYTES},
        "results": rows,
        "summary": summarize(rows),
        "tuning": dispatch.TUNING_LOG,
    }
    if output:
        with open(output, "w") as handle:
            json.dump(result, handle, indent=1)
    return result


def summarize(rows: list[dict]) -> list[dict]:
    """Per (dtype, M): sums over shapes of each method's time, sum ratios, the worst shape ratio."""
    summary = []
    for dtype in sorted({r["dtype"] for r in rows}):
        for m in sorted({r["M"] for r in rows}):
            group = [r for r in rows if r["dtype"] == dtype and r["M"] == m]
            if not group:
                continue
            entry = {
                "dtype": dtype, "M": m, "shapes": [r["shape"] for r in group],
                "dense_graph_us": sum(r["dense_graph_us"] for r in group),
                "ours_graph_us": sum(r["ours_graph_us"] for r in group),
                "ours_nopdl_graph_us": sum(r.get("ours_nopdl_graph_us", r["ours_graph_us"]) for r in group),
                "dense_eager_us": sum(r["dense_eager_us"] for r in group),
                "ours_eager_us": sum(r["ours_eager_us"] for r in group),
                "min_shape_ratio_graph": min(r["ratio_graph"] for r in group),
                "min_shape_ratio_graph_nopdl": min(r.get("ratio_graph_nopdl", r["ratio_graph"]) for r in group),
            }
            entry["sum_ratio_graph_nopdl"] = entry["dense_graph_us"] / entry["ours_nopdl_graph_us"]
            entry["sum_ratio_graph"] = entry["dense_graph_us"] / entry["ours_graph_us"]
            entry["sum_ratio_eager"] = entry["dense_eager_us"] / entry["ours_eager_us"]
            if all("tinygemm_graph_us" in r for r in group):
                entry["tinygemm_graph_us"] = sum(r["tinygemm_graph_us"] for r in group)
                entry["tinygemm_sum_ratio_graph"] = entry["dense_graph_us"] / entry["tinygemm_graph_us"]
            summary.append(entry)
    return summary


def format_summary(result: dict) -> str:
    """A Markdown table of the summary rows."""
    lines = ["| dtype | M | dense µs (sum) | ours µs (sum) | ours ratio | worst shape | no-PDL ratio | eager ratio "
             "| tinygemm ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        tiny = f"{s['tinygemm_sum_ratio_graph']:.2f}×" if "tinygemm_sum_ratio_graph" in s else "–"
        nopdl = f"{s['sum_ratio_graph_nopdl']:.2f}×" if "sum_ratio_graph_nopdl" in s else "–"
        lines.append(f"| {s['dtype']} | {s['M']} | {s['dense_graph_us']:.1f} | {s['ours_graph_us']:.1f} | "
                     f"{s['sum_ratio_graph']:.2f}× | {s['min_shape_ratio_graph']:.2f}× | {nopdl} | "
                     f"{s['sum_ratio_eager']:.2f}× | {tiny} |")
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="neural-quantize bench", description=__doc__.split("\n")[0],
                                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shapes", default=",".join(MISTRAL_7B_SHAPES),
                        help="comma-separated names from " + ", ".join(MISTRAL_7B_SHAPES) + " or KxN pairs")
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)),
                        help="comma-separated activation rows (M) to time")
    parser.add_argument("--dtypes", default="float16,bfloat16", help="comma-separated activation dtypes")
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8), help="code width of the packed weights")
    parser.add_argument("--group-size", type=int, default=128, help="input columns per scale")
    parser.add_argument("--asym", action="store_true", help="asymmetric zero points")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per case (the median is reported)")
    parser.add_argument("--graph-calls", type=int, default=20, help="calls captured per CUDA graph")
    parser.add_argument("--no-tinygemm", action="store_true",
                        help="skip PyTorch's int4 kernel (_weight_int4pack_mm) as a baseline")
    parser.add_argument("--output", default=None, help="write the JSON result here (default: print only)")
    return parser


def parse_shapes(text: str) -> dict[str, tuple[int, int]]:
    shapes = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if item in MISTRAL_7B_SHAPES:
            shapes[item] = MISTRAL_7B_SHAPES[item]
        else:
            k, n = item.lower().split("x")
            shapes[item] = (int(k), int(n))
    return shapes


def main(argv: Sequence[str] | None = None) -> int:
    """``neural-quantize bench [options]``: run :func:`run_kernel_benchmark` and print a summary."""
    args = build_parser().parse_args(argv)
    result = run_kernel_benchmark(
        shapes=parse_shapes(args.shapes),
        batch_sizes=[int(b) for b in args.batch_sizes.split(",") if b],
        dtypes=[d for d in args.dtypes.split(",") if d],
        bits=args.bits, group_size=args.group_size, sym=not args.asym, repeats=args.repeats,
        graph_calls=args.graph_calls, tinygemm=not args.no_tinygemm, output=args.output,
    )
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
