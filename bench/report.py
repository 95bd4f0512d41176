"""The bench's results as one markdown report (two tables: prediction, training step)."""
from __future__ import annotations


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def markdown(results: dict) -> str:
    """Markdown for the dict `bench.run` writes to bench.json."""
    opts = results["options"]
    lines = [
        "# AHIQ bench: the release's way (a) vs this kit's way (b)", "",
        f"Device: {results['device']}, {results['threads']} torch threads, torch {results['torch']}. "
        f"Way (b): precision {opts['precision']}, channels_last {opts['channels_last']}, "
        f"compile {opts['compile'] or 'off'}. Random weights, synthetic images.", "",
        "## Prediction", "",
        "(a) runs both full backbones on dis and ref of every pair for every member, torchvision deform; "
        "it is timed on the first `(a) timed pairs` pairs of each member. (b) computes each backbone once per "
        "image and view (shared by the members) and the reference's part once per (reference, view); it is "
        "timed on all `pairs`. Each way scores one pair untimed first (warm-up). pairs/s: timed pairs scored "
        "by every member, over their seconds; `pairs x views`: per member group, the views scored per image, "
        "\"(of N)\" when --views kept the first of the member's N. `speed-up, wall time`: (a)'s wall seconds per pair over (b)'s (above "
        "1: (b) is faster). "
        "`speed-up, process CPU time`: (a)'s CPU seconds per pair over (b)'s, each measured with the process's "
        "CPU clock (all its threads) over its own timed pairs; other jobs on a shared machine do not stretch "
        "it (on a GPU it counts the host's work only). `max abs(a-b)`: largest score difference over the pairs "
        "both ways scored; `range (b)`: max - min of (b)'s scores (smallest over the members), to read it "
        "against: random heads score in a narrow range. Peak: memory added during the run; (b) runs its "
        "backbone groups one after the other. TFLOP/s: each way's counted FLOPs per pair over its seconds "
        "per pair, both deformable convs counted alike (bench/bench.md).", "",
    ]
    flops = any("a_tflops" in r for r in results["predict"])
    head = ("| config | members | pairs x views | (a) timed pairs | (a) pairs/s | (b) pairs/s | speed-up, wall time "
            "| speed-up, process CPU time | max abs(a-b) | range (b) | peak MiB (a) | peak MiB (b) |")
    head += " TFLOP/s (a) | TFLOP/s (b) |" if flops else ""
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results["predict"]:
        views = r["views"] + (f" (of {r['configured_views']})" if r.get("configured_views", r["views"]) != r["views"] else "")
        cells = [r["config"], str(r["members"]), f"{r['pairs']} x {views}", str(r["release_pairs"]),
                 f"{r['a_pairs_per_s']:.4g}", f"{r['b_pairs_per_s']:.4g}", f"{r['speedup']:.2f}x", _ratio(r.get("speedup_cpu")),
                 f"{r['max_abs_diff']:.2e}", f"{r['score_range']:.2e}", _num(r["a_peak_mib"], ".0f"), _num(r["b_peak_mib"], ".0f")]
        if flops:
            cells += [_num(r.get("a_tflops"), ".3g"), _num(r.get("b_tflops"), ".3g")]
        lines.append("| " + " | ".join(cells) + " |")
    if results["train"]:
        lines += ["", "## Training step", "",
                  "(a) the release: full backbones with an autograd graph (backward goes through them), dis and "
                  "ref in separate calls. (b) this kit (`members.train.loop`): truncated backbones under no_grad, dis and "
                  "ref in one call per backbone; heads and Adam step identical. s/step: the mean of `steps` "
                  "steps, timed after one untimed step; speed-up: (a)'s wall seconds per step over (b)'s.", "",
                  "| config | batch | steps | (a) s/step | (b) s/step | speed-up | peak MiB (a) | peak MiB (b) | memory b/a |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in results["train"]:
            lines.append(f"| {r['config']} | {r['batch']} | {r['steps']} | {r['a_step_s']:.3f} | {r['b_step_s']:.3f} | "
                         f"{r['speedup']:.2f}x | {_num(r['a_peak_mib'], '.0f')} | {_num(r['b_peak_mib'], '.0f')} | "
                         f"{_num(r['memory_ratio'], '.2f')} |")
    return "\n".join(lines) + "\n"
