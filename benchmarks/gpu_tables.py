"""Judge the GPU goals from a gpu_check.sh results folder and write its tables (no GPU).

Reads a GPU results folder (benchmarks/gpu_check.sh) and judges issue 17's goals: summary.md in the folder
and/or the README's GPU table between ``<!-- gpu-table -->`` and ``<!-- /gpu-table -->``.

    python benchmarks/gpu_tables.py DIR --summary     # DIR/summary.md (gpu_check.sh's last phase)
    python benchmarks/gpu_tables.py DIR --readme      # rewrite README.md's GPU table from DIR

Goals (each marked met / short with the number, or "not measured" when the folder has no such row):

1. the statistics pass (``stats``, Triton impls) >= 80 % of the HBM roofline at N = 16384, V = 151936;
2. the loss on logits (``loss_pg``, ``loss_kl``, fwd + bwd) >= 3x the eager reference with <= 5 % of its extra
   memory (each Triton impl; met when one impl meets both for each loss);
3. the loss from hidden states (``linear``, default chunk) <= 1.1x the logits path's time and <= 5 % of its
   extra memory without the (V, H) weight gradient, at N = 16384, both losses;
4. the hidden-state reverse KL no slower than TRL's chunked divergence and Liger's fused linear JSD.

Older folders (run2) lack the measured no-weight-gradient peak: there the gradients of h and W are subtracted
from both paths' peaks, and the table says so.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOAL_N, GOAL_V = 16384, 151936
BEGIN, END = "<!-- gpu-table -->", "<!-- /gpu-table -->"


def _load(pattern):
    files = sorted(f for f in glob.glob(pattern) if "_smoke" not in f and not f.endswith("_cpu.json"))
    if not files:
        return None
    with open(files[0]) as f:
        return json.load(f)


def read_folder(d: str) -> dict:
    out = {"dir": d, "stats": _load(os.path.join(d, "token_stats_*.json")),
           "linear": _load(os.path.join(d, "linear_*.json")), "phases": {}, "tests": None, "versions": None}
    p = os.path.join(d, "phases.txt")
    if os.path.exists(p):
        for line in open(p):
            m = re.match(r"(\w+) exit (\d+), (\d+) s", line)
            if m:
                out["phases"][m.group(1)] = (int(m.group(2)), int(m.group(3)))  # a rerun's line wins
    x = os.path.join(d, "test_cuda.xml")
    if os.path.exists(x):
        try:
            suites = ET.parse(x).getroot()
            s = suites if suites.tag == "testsuite" else suites.find("testsuite")
            out["tests"] = {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            out["tests"]["time"] = float(s.get("time", 0))
        except (ET.ParseError, AttributeError):
            out["tests"] = None
    v = os.path.join(d, "versions.txt")
    if os.path.exists(v):
        out["versions"] = open(v).read().strip()
    return out


# ----------------------------------------------------------------------------------------------------------
# the goals
# ----------------------------------------------------------------------------------------------------------


def _ok(rows):
    return [r for r in rows if "error" not in r and r.get("ms")]


def goal_stats(data):
    st = data["stats"]
    rows = [r for r in _ok(st["rows"]) if r["N"] == GOAL_N and r["V"] == GOAL_V] if st else []
    tri = [r for r in rows if r["op"] == "stats" and r["impl"].startswith("triton") and "pct_roofline" in r]
    if not tri:
        return dict(goal="statistics pass >= 80 % of the HBM roofline", status="not measured", text="-")
    best = max(tri, key=lambda r: r["pct_roofline"])
    ref = {r["impl"]: r["ms"] for r in rows if r["op"] == "stats" and r["impl"] in ("eager", "compile")}
    parts = [f"`{r['impl']}` {r['ms']:.2f} ms, {r['pct_roofline']:.1f} %"
             + "".join(f", {ref[i] / r['ms']:.1f}× {i}" for i in ("eager", "compile") if i in ref) for r in tri]
    kl = [r for r in rows if r["op"] == "stats_kl" and r["impl"].startswith("triton") and "pct_roofline" in r]
    if kl:
        parts.append("with the KL: " + ", ".join(f"`{r['impl']}` {r['pct_roofline']:.1f} %" for r in kl))
    return dict(goal="statistics pass >= 80 % of the HBM roofline", status="met" if best["pct_roofline"] >= 80
                else "short", text="; ".join(parts))


def goal_loss(data):
    st = data["stats"]
    rows = [r for r in _ok(st["rows"]) if r["N"] == GOAL_N and r["V"] == GOAL_V] if st else []
    parts, met_all, any_row = [], True, False
    for op, name in (("loss_pg", "pg"), ("loss_kl", "reverse_kl")):
        eager = next((r for r in rows if r["op"] == op and r["impl"] == "eager"), None)
        tri = [r for r in rows if r["op"] == op and r["impl"].startswith("triton")]
        if eager is None or not tri:
            met_all = False
            continue
        any_row = True
        met_op = False
        for r in tri:
            speed = eager["ms"] / r["ms"]
            mem = r.get("extra_mem_mib", float("nan")) / eager["extra_mem_mib"] if eager.get("extra_mem_mib") else None
            ok = speed >= 3 and mem is not None and mem <= 0.05
            met_op |= ok
            mem_s = "?" if mem is None else f"{100 * mem:.3g} %"
            parts.append(f"{name} `{r['impl']}`: {speed:.1f}× eager, {mem_s} of its memory")
        met_all &= met_op
    if not any_row:
        return dict(goal="loss on logits >= 3× eager with <= 5 % of its extra memory", status="not measured", text="-")
    return dict(goal="loss on logits >= 3× eager with <= 5 % of its extra memory",
                status="met" if met_all else "short", text="; ".join(parts))


def _linear_rows(data):
    lin = data["linear"]
    return _ok(lin["rows"]) if lin else []


def _default(r):
    return r["method"] == "linear" and not r.get("sweep")


def _no_wgrad_ratio(r, base):
    """(ratio, how): measured without the weight gradient, or (older folders) with h's and W's gradients
    subtracted from both peaks."""
    a, b = r.get("extra_peak_no_wgrad_mib"), base.get("extra_peak_no_wgrad_mib")
    if a is not None and b:
        return a / b, "measured"
    if "grads_mib" in r and "grads_mib" in base and (base.get("extra_peak_mib") or 0) > base["grads_mib"]:
        return (r["extra_peak_mib"] - r["grads_mib"]) / (base["extra_peak_mib"] - base["grads_mib"]), "subtracted"
    return None, None


def goal_linear(data):
    rows = _linear_rows(data)
    goal = "hidden-state loss <= 1.1× the logits path's time, <= 5 % of its memory without the W gradient (N = 16384)"
    parts, met, seen, hows = [], True, False, set()
    for loss in ("reverse_kl", "pg"):
        base = next((r for r in rows if r["method"] == "logits" and r["loss"] == loss and r["N"] == GOAL_N), None)
        lin = next((r for r in rows if _default(r) and r["loss"] == loss and r["N"] == GOAL_N), None)
        if base is None or lin is None:
            met = False
            continue
        seen = True
        t = lin["ms"] / base["ms"]
        m, how = _no_wgrad_ratio(lin, base)
        hows.add(how)
        chunk = f", chunk {lin['chunk']}" if lin.get("chunk") else ""
        parts.append(f"{loss}{chunk}: {t:.2f}× ({lin['ms']:.1f} / {base['ms']:.1f} ms), "
                     f"{'?' if m is None else f'{100 * m:.1f} %'} of its memory"
                     + (f" ({100 * lin['extra_peak_mib'] / base['extra_peak_mib']:.1f} % with it)"
                        if lin.get("extra_peak_mib") is not None and base.get("extra_peak_mib") else ""))
        met &= t <= 1.1 and m is not None and m <= 0.05
    if not seen:
        return dict(goal=goal, status="not measured", text="-")
    text = "; ".join(parts) + ("; without the W gradient by subtracting h's and W's gradients (older run)"
                               if "subtracted" in hows else "")
    return dict(goal=goal, status="met" if met else "short", text=text)


def goal_vs_others(data):
    rows = _linear_rows(data)
    goal = "hidden-state reverse KL no slower than TRL's and Liger's"
    all_rows = data["linear"]["rows"] if data["linear"] else []
    parts, met, seen, measured = [], True, False, set()
    for n in sorted({r["N"] for r in rows}, reverse=True):
        lin = next((r for r in rows if _default(r) and r["loss"] == "reverse_kl" and r["N"] == n), None)
        if lin is None:
            continue
        for other in ("trl", "liger", "liger_compiled"):
            o = next((r for r in rows if r["method"] == other and r["loss"] == "reverse_kl" and r["N"] == n), None)
            if o is None:
                err = next((r.get("error") for r in all_rows if r["method"] == other and r["N"] == n), None)
                if err:
                    parts.append(f"N={n} {other}: {err.split(':')[0]}")
                continue
            seen = True
            measured.add(other.split("_")[0])
            parts.append(f"N={n}: {lin['ms']:.1f} ms vs {other} {o['ms']:.1f} ms ({lin['ms'] / o['ms']:.2f}×)")
            met &= lin["ms"] <= o["ms"]
    if not seen:
        return dict(goal=goal, status="not measured", text="; ".join(parts) or "TRL and Liger not installed there")
    missing = sorted({"trl", "liger"} - measured)
    status = "met" if met else "short"
    if missing:
        status += f" where measured ({' and '.join(missing)} not measured)"
    return dict(goal=goal, status=status, text="; ".join(parts))


def goals(data):
    return [goal_stats(data), goal_loss(data), goal_linear(data), goal_vs_others(data)]


def _versions_line(data):
    meta = (data["stats"] or {}).get("meta", {})
    lv = (data["linear"] or {}).get("versions", {})
    gpu = meta.get("gpu") or lv.get("gpu") or "?"
    bits = [f"torch {meta.get('torch') or lv.get('torch')}", f"Triton {meta.get('triton') or lv.get('triton')}",
            f"CUDA {meta.get('torch_cuda') or lv.get('cuda')}"]
    if meta.get("driver"):
        bits.append(f"driver {meta['driver']}")
    if lv:
        bits.append(f"trl {lv.get('trl') or 'not installed'}, liger-kernel {lv.get('liger_kernel') or 'not installed'}")
    return gpu, ", ".join(bits)


def goals_table(data, rel_dir: str) -> str:
    gpu, vers = _versions_line(data)
    lines = [f"| goal (issue 17), bf16, V = 151936 | measured on one {gpu} | status |", "|---|---|---|"]
    for g in goals(data):
        status = g["status"].replace("short", "**short**", 1) if g["status"].startswith("short") else g["status"]
        lines.append(f"| {g['goal']} | {g['text']} | {status} |")
    lines += ["", f"{vers}; one run, [`{rel_dir}`]({rel_dir}); this table is written by "
              f"`python benchmarks/gpu_tables.py {rel_dir} --readme`."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# summary.md
# ----------------------------------------------------------------------------------------------------------


def summary(data) -> str:
    gpu, vers = _versions_line(data)
    out = [f"# issue 17 on one {gpu}", "", vers, ""]
    if data["versions"]:
        out += ["```", data["versions"], "```", ""]
    out += ["## Goals", "", "| goal | measured | status |", "|---|---|---|"]
    out += [f"| {g['goal']} | {g['text']} | {g['status']} |" for g in goals(data)]
    out += ["", "## Correctness", ""]
    check = (data["stats"] or {}).get("meta", {}).get("check")
    out.append(f"- fp64 check of the kernels: {json.dumps(check) if check is not None else 'not run'}")
    lin_rows = (data["linear"] or {}).get("rows", [])
    bad = [r["loss_mismatch"] for r in lin_rows if r.get("loss_mismatch")]
    vals = [f"{r['method']} {r['loss']} N={r['N']}: {r['loss_value']:.6f}" for r in lin_rows if "loss_value" in r]
    out.append(f"- hidden-state loss values: {'**LOSS MISMATCH**: ' + '; '.join(bad) if bad else 'all agree'}"
               + (f" ({'; '.join(vals)})" if vals else ""))
    t = data["tests"]
    out.append("- CUDA tests: " + ("no test_cuda.xml" if t is None else
               f"{t['tests']} run, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped in {t['time']:.0f} s"))
    if data["phases"]:
        out += ["", "## Phases", "", "| phase | exit | seconds |", "|---|---|---|"]
        out += [f"| {k} | {v[0]}{' (time cap)' if v[0] in (124, 137) else ''} | {v[1]} |" for k, v in data["phases"].items()]
    lin = data["linear"]
    if lin:
        rows = _ok(lin["rows"])
        extra = [r for r in rows if r["method"] != "logits" and r["N"] == GOAL_N]
        if extra:
            out += ["", "## Hidden-state rows at N = 16384 (× the baseline: logits, or logits_rule for the rule rows)",
                    "", "| loss | method | chunk | ms | × time | extra MiB | no-W-grad MiB | × no-W-grad | loss value |",
                    "|---|---|---|---|---|---|---|---|---|"]
            for r in extra:
                out.append(f"| {r['loss']} | {r['method']} | {r.get('chunk') or '-'} | {r['ms']:.1f} | "
                           f"{r.get('time_ratio', float('nan')):.3f} | {r.get('extra_peak_mib')} | "
                           f"{r.get('extra_peak_no_wgrad_mib', '-')} | {r.get('mem_ratio_no_wgrad', '-')} | "
                           f"{r['loss_value']:.6f} |")
    return "\n".join(out) + "\n"


def rewrite_readme(readme: str, table: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README has no {BEGIN} ... {END} markers")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + BEGIN + "\n" + table + "\n" + END + tail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="a results folder of benchmarks/gpu_check.sh")
    p.add_argument("--summary", action="store_true", help="write DIR/summary.md")
    p.add_argument("--readme", nargs="?", const=os.path.join(ROOT, "README.md"), default=None,
                   help="rewrite the GPU table of this README (default: the repository's)")
    args = p.parse_args(argv)
    data = read_folder(args.dir)
    if not data["stats"] and not data["linear"]:
        print(f"{args.dir}: no token_stats_*.json or linear_*.json", file=sys.stderr)
    if args.summary:
        with open(os.path.join(args.dir, "summary.md"), "w") as f:
            f.write(summary(data))
        print(f"wrote {os.path.join(args.dir, 'summary.md')}")
    if args.readme:
        rel = os.path.relpath(os.path.abspath(args.dir), os.path.dirname(os.path.abspath(args.readme)))
        table = goals_table(data, rel.replace(os.sep, "/").rstrip("/") + "/")
        text = open(args.readme, encoding="utf-8").read()
        with open(args.readme, "w", encoding="utf-8") as f:
            f.write(rewrite_readme(text, table))
        print(f"rewrote the GPU table of {args.readme}")
    if not (args.summary or args.readme):
        for g in goals(data):
            print(f"{g['status']:>12}  {g['goal']}: {g['text']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
