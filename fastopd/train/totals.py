"""The metrics of one optimizer step, summed over micro-batches and processes (:class:`StepTotals`)."""

from __future__ import annotations

import torch

from fastopd.common import RELEASE_SUM_KEYS, release_means, release_sums
from fastopd.train.rollouts import Rollouts


class StepTotals:
    """Sums of one step's diagnostics; ``reduce`` adds them up over processes and returns the means.

    The rule's diagnostics are :func:`fastopd.common.release_sums` added over micro-batches (and
    processes), turned into means by :func:`fastopd.common.release_means`: one definition for a batch,
    a step and the demo's logs.
    """

    KEYS = ("loss", "micro", "adv", "margin", "length", "stopped", "correct", "answered") + RELEASE_SUM_KEYS
    # what the step cost (Rollouts.counts; docs/training.md): sampled tokens, sampling rows x steps, teacher
    # tokens (scored while sampling + forwarded for the loss), student positions forwarded for the loss, the
    # rollouts the online rule stopped, the teacher's and the rule's seconds while sampling
    COST_KEYS = ("generated", "decode_rows", "teacher_scored", "teacher_forwarded", "student_forwarded",
                 "online_stopped", "time_generate_teacher", "time_generate_rule")
    # a served teacher (teacher: http://...): valid tokens whose margin was exact, the server's seconds
    SERVED_KEYS = ("margin_exact", "server_latency", "served_micro")

    def __init__(self):
        self.sums = dict.fromkeys(self.KEYS + self.COST_KEYS + self.SERVED_KEYS, 0.0)

    def add(self, out, rollouts: Rollouts, correct: int, answered: int) -> None:
        m, dec = out.metrics, out.release
        s = self.sums
        s["loss"] += float(out.loss.detach())
        s["micro"] += 1
        s["adv"] += m["adv_mean"] * m["num_valid"]
        s["margin"] += m["margin_mean"] * m["num_valid"]
        s["length"] += float(rollouts.lengths.sum())
        s["stopped"] += float(rollouts.stopped.sum())
        s["correct"] += correct
        s["answered"] += answered
        rule = dec.totals if dec is not None else release_sums([], [], [], m["num_valid"], m["num_kept"])
        rule = dict(rule, rollouts=float(len(rollouts.texts)))
        for key in RELEASE_SUM_KEYS:
            s[key] += rule[key]
        counts = rollouts.counts
        s["generated"] += counts.get("generated", float(rollouts.lengths.sum()))
        s["student_forwarded"] += counts.get("student_forwarded", float(rollouts.targets.numel()))
        for key in ("decode_rows", "teacher_scored", "teacher_forwarded"):
            s[key] += counts.get(key, 0)
        if "margin_exact_share" in m:
            s["margin_exact"] += m["margin_exact_share"] * m["num_valid"]
            s["server_latency"] += m.get("teacher_latency_s", 0.0)
            s["served_micro"] += 1
        if rollouts.online is not None:
            s["online_stopped"] += float(rollouts.online.decision.stopped.sum())
            s["time_generate_teacher"] += rollouts.online.time_teacher
            s["time_generate_rule"] += rollouts.online.time_rule

    def reduce(self, accelerator) -> dict:
        keys = self.KEYS + self.COST_KEYS + self.SERVED_KEYS
        vec = torch.tensor([self.sums[k] for k in keys], dtype=torch.float64)
        if accelerator.num_processes > 1:
            vec = accelerator.reduce(vec.to(accelerator.device), reduction="sum").cpu()
        s = dict(zip(keys, vec.tolist()))
        nan = float("nan")
        rule = release_means(s)
        out = {
            "loss": s["loss"] / max(s["micro"], 1),
            "adv_mean": s["adv"] / max(s["valid"], 1),
            "margin_mean": s["margin"] / max(s["valid"], 1),
            "kept_fraction": rule["kept_fraction"],
            "accept_rate": rule["accept_rate"],
            "gain_mean": rule["gain_mean"],
            "release_position": rule["release_position"],
            "tokens": int(s["valid"]),
            "tokens_supervised": int(s["kept"]),
            "rollouts": int(s["rollouts"]),
            "completion_length": s["length"] / max(s["rollouts"], 1),
            "stop_rate": s["stopped"] / max(s["rollouts"], 1),
            "sample_accuracy": s["correct"] / s["answered"] if s["answered"] else nan,
            "tokens_generated": int(s["generated"]),
            "generate_row_steps": int(s["decode_rows"]),
            "teacher_tokens": int(s["teacher_scored"] + s["teacher_forwarded"]),
            "teacher_tokens_sampling": int(s["teacher_scored"]),
            "student_tokens_forwarded": int(s["student_forwarded"]),
            "online_stop_rate": s["online_stopped"] / max(s["rollouts"], 1),
            "time_generate_teacher": s["time_generate_teacher"] / max(accelerator.num_processes, 1),
            "time_generate_rule": s["time_generate_rule"] / max(accelerator.num_processes, 1),
        }
        if s["served_micro"]:  # the share of exact margins (docs/formulas.md §7) and the server's seconds
            out["margin_exact_share"] = s["margin_exact"] / max(s["valid"], 1)
            out["teacher_latency_s"] = s["server_latency"] / max(accelerator.num_processes, 1)
        return out
