"""Every GPU benchmark of mae_st in one command: footage and packing, NVDEC correctness, DALI loader throughput
and its levers, the classic PyAV loader, the matmul roofline, the ViT-H MAE-ST/finetune step inside the
DeepSpeed engine (ZeRO-3 vs none, activation checkpointing), and training fed by DALI vs resident clips.

    python benchmarks/bench.py --out $OUT --photos .devcarry/c3/photos.npz        # ~8 min on one H100
    python benchmarks/bench.py --tiny --device cpu --out /tmp/bench_tiny          # every code path, on a CPU

Each section runs in its own process under a time budget (killed when it overruns, so a hang or a CUDA error
costs one section, not the run); its rows are appended to <out>/bench.json as soon as it ends, with its
traceback if it failed. Sections: env, then data, check, pipeline, classic, matmul, model, e2e.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.harness import REPO, SectionContext, Sizes, child_env, gpu_profile, tiny_profile  # noqa: E402

# section -> (function, planned seconds on an H100, least seconds worth starting it with)
SECTIONS: Dict[str, tuple] = {
    "env": ("benchmarks.bench:run_env", 15, 10),
    "data": ("benchmarks.bench_data:run_data", 80, 30),
    "check": ("benchmarks.bench_check:run_check", 60, 20),
    "pipeline": ("benchmarks.bench_pipeline:run_pipeline", 95, 25),
    "classic": ("benchmarks.bench_pipeline:run_classic", 35, 20),
    "matmul": ("benchmarks.bench_model:run_matmul", 15, 10),
    "model": ("benchmarks.bench_model:run_model", 120, 40),
    "e2e": ("benchmarks.bench_model:run_e2e", 60, 30),
}
TINY_SECTION_SECONDS = 900  # the CPU check has no time pressure, only a guard against hangs
GRACE_SECONDS = 20  # past its budget a section gets this long to finish its row before it is killed
DEFAULT_TOTAL_SECONDS = 480
HIDDEN_COLUMNS = ("path", "log", "error")  # in bench.json, not in the printed tables



def _ints(text: str) -> tuple:
    return tuple(int(v) for v in text.split(","))


def _names(text: str) -> tuple:
    return tuple(v.strip() for v in text.split(",") if v.strip())


SIZE_FLAGS = {  # Sizes field -> parser of its flag (--videos, --loader-steps, ...)
    "videos": int, "seconds": float, "loader_steps": int, "loader_seconds": float, "classic_workers": _ints,
    "matmul_n": int,
    "pretrain_clips": int, "finetune_clips": int, "model_variants": _names, "model_steps": int, "e2e_steps": int,
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out", help="folder for bench.json and logs (e.g. $OUT)")
    p.add_argument("--work-dir", default=None, help="scratch folder for footage and shards (default: a temp dir)")
    p.add_argument("--sections", default=",".join(s for s in SECTIONS if s != "env"),
                   help=f"comma list of {', '.join(s for s in SECTIONS if s != 'env')}")
    p.add_argument("--tiny", action="store_true", help="tiny sizes and models: every code path in minutes on a CPU")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--photos", default=None, help=".npz of photographs for the footage (when sklearn is absent)")
    p.add_argument("--shards", action="append", default=[],
                   help="[name=]folder of packed shards to benchmark instead of packing footage (repeatable; "
                        "the first is the default set)")
    p.add_argument("--total-budget", type=float, default=None,
                   help=f"seconds for the whole run (default {DEFAULT_TOTAL_SECONDS}; --tiny: none)")
    p.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS",
                   help="override one section's planned seconds")
    sizes = p.add_argument_group("sizes (defaults: the H100 profile, or the tiny one with --tiny)")
    for name, parse in SIZE_FLAGS.items():
        sizes.add_argument("--" + name.replace("_", "-"), dest=name, type=parse, default=None,
                           help="comma list" if parse in (_ints, _names) else None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--context", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_sizes(args: argparse.Namespace) -> Sizes:
    sizes = tiny_profile() if args.tiny else gpu_profile()
    overrides = {name: getattr(args, name) for name in SIZE_FLAGS if getattr(args, name) is not None}
    return dataclasses.replace(sizes, **overrides)


# ---- orchestration (the parent never imports torch) -------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.child:
        run_child(args.child, Path(args.context))
        return
    sections = ["env"] + [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        sys.exit(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.stdout = Tee(sys.__stdout__, out / "bench.log")
    work = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="mae_st_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
              "cwd": os.getcwd(), "work_dir": str(work), "sizes": dataclasses.asdict(build_sizes(args)),
              "sections": {}}
    run_sections(args, sections, out, work, report)
    report["summary"] = headlines(report)
    write_report(out, report)
    print_summary(report, out)


def run_sections(args, sections: List[str], out: Path, work: Path, report: dict) -> None:
    planned = planned_seconds(args, sections)
    started = time.time()
    total = args.total_budget or (len(sections) * TINY_SECTION_SECONDS if args.tiny else DEFAULT_TOTAL_SECONDS)
    planned_so_far = 0.0
    for i, name in enumerate(sections):
        elapsed = time.time() - started
        banked = max(planned_so_far - elapsed, 0.0)  # time earlier sections did not use
        reserve = sum(SECTIONS[later][2] for later in sections[i + 1:])
        budget = min(planned[name] + banked, total - elapsed - reserve)
        planned_so_far += planned[name]
        print(f"\n=== {name}: budget {budget:.0f} s (run at {elapsed:.0f} s of {total:.0f}) ===", flush=True)
        if budget < SECTIONS[name][2]:
            result = {"status": "skipped: not enough of the total time budget left", "rows": []}
        else:
            ctx = SectionContext(sizes=build_sizes(args), device=args.device, work_dir=str(work),
                                 out_dir=str(out), deadline=time.time() + budget,
                                 rows_path=str(work / f"rows_{name}.jsonl"), prior=_prior_rows(report),
                                 photos=_absolute(args.photos), shards=[_absolute_shards(s) for s in args.shards])
            result = run_section_process(name, ctx, work)
        report["sections"][name] = result
        if name == "env" and result["rows"]:
            report["environment"] = result["rows"][0]  # device, driver and versions, at the top of bench.json
        print_section(name, result)
        write_report(out, report)


def _absolute(path: Optional[str]) -> Optional[str]:
    """Sections run from the repository root: paths given relative to where the command ran are fixed here."""
    return str(Path(path).resolve()) if path else None


def _absolute_shards(spec: str) -> str:
    name, sep, path = spec.rpartition("=")
    return f"{name}{sep}{_absolute(path)}"


def planned_seconds(args, sections: List[str]) -> Dict[str, float]:
    planned = {name: TINY_SECTION_SECONDS if args.tiny else SECTIONS[name][1] for name in sections}
    for spec in args.budget:
        name, _, seconds = spec.partition("=")
        if name not in SECTIONS or not seconds:
            sys.exit(f"--budget {spec}: expected SECTION=SECONDS with SECTION in {', '.join(SECTIONS)}")
        planned[name] = float(seconds)
    return planned


def run_section_process(name: str, ctx: SectionContext, work: Path) -> dict:
    """Runs one section in a child process; kills its whole process group when it overruns."""
    context_path = work / f"context_{name}.json"
    Path(ctx.rows_path).unlink(missing_ok=True)
    ctx.save(context_path)
    started = time.time()
    child = subprocess.Popen([sys.executable, "-u", str(Path(__file__).resolve()), "--child", name,
                              "--context", str(context_path)], cwd=REPO, env=child_env(), start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    forwarder = threading.Thread(target=_forward, args=(child.stdout,), daemon=True)
    forwarder.start()
    try:
        returncode = child.wait(timeout=max(ctx.deadline - time.time(), 1) + GRACE_SECONDS)
        status = "ok" if returncode == 0 else f"failed (exit {returncode})"
    except subprocess.TimeoutExpired:
        _kill_group(child)
        status = "killed: over its time budget"
    forwarder.join(timeout=5)
    rows = _read_rows(Path(ctx.rows_path))
    if status == "ok" and any("error" in r for r in rows):
        status = "errors in some rows"
    return {"status": status, "seconds": round(time.time() - started, 1), "rows": rows}


def _forward(pipe) -> None:
    """Copies a child's output to ours (and so to bench.log) line by line."""
    for line in pipe:
        sys.stdout.write(line)


class Tee:
    """The console, copied to <out>/bench.log: a remote runner may return only the tail of the console."""

    def __init__(self, console, log_path: Path):
        self.console, self.log = console, open(log_path, "a", buffering=1)

    def write(self, text: str) -> int:
        self.console.write(text)
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        self.log.flush()


def _kill_group(child: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _read_rows(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return rows


def _prior_rows(report: dict) -> Dict[str, List[dict]]:
    return {name: result["rows"] for name, result in report["sections"].items()}


def write_report(out: Path, report: dict) -> None:
    path = out / "bench.json"
    path.with_suffix(".tmp").write_text(json.dumps(report, indent=1, default=str))
    path.with_suffix(".tmp").replace(path)


# ---- child side -----------------------------------------------------------------------------------------------


def run_child(name: str, context_path: Path) -> None:
    """Runs one section function; a failure becomes an "error" row with its traceback (and exit code 1)."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # library notices drown the rows
    ctx = SectionContext.load(context_path)
    module_name, function_name = SECTIONS[name][0].split(":")
    try:
        module = __import__(module_name, fromlist=[function_name])
        getattr(module, function_name)(ctx)
    except BaseException:  # noqa: B036 - record every failure, including KeyboardInterrupt from a kill
        traceback.print_exc()
        ctx.emit({"error": traceback.format_exc()})
        sys.exit(1)


def run_env(ctx: SectionContext) -> None:
    """Where the numbers come from: device, driver, library versions, CPU and shared memory."""
    import platform
    import shutil
    from importlib import metadata

    import torch

    from benchmarks.harness import resolve_device

    device = resolve_device(ctx.device)
    row = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cpus": os.cpu_count(), "shm GB": round(shutil.disk_usage("/dev/shm").free / 1e9, 1)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        row.update({"capability": f"{props.major}.{props.minor}", "GPU GB": round(props.total_memory / 2**30, 1),
                    "driver": _nvidia_smi("driver_version")})
    for dist in ("nvidia-dali-cuda130", "deepspeed", "webdataset", "av", "numpy", "timm", "scikit-learn"):
        try:
            row[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            row[dist] = None
    ctx.emit(row)


def _nvidia_smi(field: str) -> Optional[str]:
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader", "-i", "0"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


# ---- tables -----------------------------------------------------------------------------------------------------


def print_section(name: str, result: dict) -> None:
    print(f"--- {name}: {result['status']} ({result.get('seconds', 0):.0f} s)")
    rows = result["rows"]
    table = [{k: v for k, v in r.items() if k not in HIDDEN_COLUMNS} for r in rows]
    print(format_table([r for r in table if r]))
    for row in rows:
        if "error" in row:
            print("error: " + row["error"].strip().splitlines()[-1])
    sys.stdout.flush()


def format_table(rows: List[dict]) -> str:
    if not rows:
        return "(no rows)"
    columns: List[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "-"
    text = str(value)
    return text if len(text) <= 48 else text[:45] + "..."


def headlines(report: dict) -> List[dict]:
    """The figures the issues ask for, one row each, from the sections' rows."""
    sections = report["sections"]

    def rows(name: str) -> List[dict]:
        return sections.get(name, {}).get("rows", [])

    lines = []
    for r in rows("data"):
        if r.get("step") == "pack":
            lines.append(_line("data", f"pack {r['set']} ({r['codec']})", f"{r['MB']:.1f} MB, {r['seconds']:.1f} s"))
    for r in rows("check"):
        if "decode" in r:
            lines.append(_line("check", f"tests {r['decode']}/{r['codec']}", f"{r['passed']} passed, "
                               f"{r['failed']} failed, {r['errors']} errors"))
    for r in rows("pipeline"):
        if r.get("lever") == "base" and r.get("clips/s"):
            lines.append(_line("pipeline", f"{r['mode']} {r['set']} ({r['codec']})",
                               f"{r['clips/s']:.0f} clips/s, NVDEC {_pct(r.get('nvdec %'))}"))
    for r in rows("classic"):
        if "ratio" in r:
            lines.append(_line("classic", "ours/classic clips/s", f"{r['ratio']:.1f}x (target >= 5x)"))
    for r in rows("matmul"):
        if r.get("TFLOP/s"):
            lines.append(_line("matmul", f"{r['dtype']} {r['n']}^3", f"{_num(r['TFLOP/s'])} TFLOP/s"))
    for r in rows("model"):
        if r.get("clips/s"):
            lines.append(_line("model", r["variant"], f"{_num(r['clips/s'])} clips/s at {r['clips/step']}/step, "
                               f"{_num(r['TFLOP/s'])} TFLOP/s, MFU {_pct(r['MFU'] and 100 * r['MFU'])}, "
                               f"peak {_num(r.get('peak GB'))} GB"))
    lines += _model_comparisons({r["variant"]: r for r in rows("model") if r.get("clips/s")})
    for r in rows("e2e"):
        if "ratio" in r:
            lines.append(_line("e2e", "DALI-fed / resident clips/s", f"{_pct(r['ratio'] and 100 * r['ratio'])} "
                               "(target >= 95%)"))
    for name, result in sections.items():
        if result["status"] != "ok":
            lines.append(_line(name, "status", result["status"]))
    return lines


def _model_comparisons(variants: Dict[str, dict]) -> List[dict]:
    """ZeRO-3's cost against no ZeRO, and activation checkpointing's cost and memory saving."""
    lines = []
    z3, z0, ckpt = (variants.get(v) for v in ("pretrain-z3", "pretrain-z0", "pretrain-z3-ckpt"))
    if z3 and z0:
        lines.append(_line("model", "ZeRO-3 / no ZeRO clips/s", _pct(100 * z3["clips/s"] / z0["clips/s"])))
    if z3 and ckpt:
        memory = (f", peak {_num(ckpt.get('peak GB'))} vs {_num(z3.get('peak GB'))} GB"
                  if ckpt.get("peak GB") is not None else "")
        lines.append(_line("model", "checkpointing / none clips/s", _pct(100 * ckpt["clips/s"] / z3["clips/s"])
                           + memory))
    return lines


def _line(section: str, what: str, value: str) -> dict:
    return {"section": section, "what": what, "value": value}


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def print_summary(report: dict, out: Path) -> None:
    env = (report["sections"].get("env", {}).get("rows") or [{}])[0]
    print(f"\n=== summary: {env.get('device', '?')}, torch {env.get('torch')}, DALI {env.get('nvidia-dali-cuda130')}, "
          f"DeepSpeed {env.get('deepspeed')} ===")
    for line in report["summary"]:
        print(f"{line['section']:>9}  {line['what']:<32}  {line['value']}")
    print(f"\nfull results: {out / 'bench.json'}", flush=True)


if __name__ == "__main__":
    main()
