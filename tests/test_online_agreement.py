"""benchmarks/online_agreement.py on hand-made rollout records: the agreement table's numbers by hand."""

from __future__ import annotations

import importlib.util
import json

import pytest

from helpers import ROOT


@pytest.fixture(scope="module")
def agreement():
    spec = importlib.util.spec_from_file_location("online_agreement", ROOT / "benchmarks" / "online_agreement.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def record(series, tokens_per_segment=4, accepted=None):
    segments = [j for j in range(len(series)) for _ in range(tokens_per_segment)]
    return {"step": 1, "length": len(segments), "margins": [0.0] * len(segments), "segments": segments,
            "series": series, "accepted": bool(accepted), "gain": 0.0}


def test_agreement_by_hand(agreement, tmp_path):
    recs = [
        record([5.0, 5.1, 4.9, 5.0, 0.1, 0.0, 0.2, 0.1, 0.0, 0.1], accepted=True),  # a clear drop at 4
        record([1.0, 1.1, 0.9, 1.0, 1.05, 0.95], accepted=False),  # flat: never released, never stopped
    ]
    run = tmp_path / "run"
    run.mkdir()
    (run / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run / "config.yaml").write_text("min_segments: 2\nmin_gain: 10.0\nonline_chunk_size: 4\n")
    out = agreement.main([str(run), "--confirm", "1", "2", "6", "--json", str(tmp_path / "a.json")])
    assert out["skipped_confirm_below_min_segments"] == [1] and out["offline_matches_log"] == 1.0
    c2, c6 = out["rows"]
    # c = 2: the drop's rollout stops after 6 segments (24 of its 40 tokens), released at 4 like the offline rule
    assert c2["stopped"] == 0.5 and c2["release_equal"] == 1.0 and c2["stopped_offline_keeps"] == 0.0
    assert c2["saved_upper"] == pytest.approx(16 / 64)
    assert c2["saved_chunked"] == pytest.approx(12 / 64)  # the stop is seen at the end of the chunk [24, 28)
    assert c2["kept_fraction_offline"] == c2["kept_fraction_online"] == pytest.approx((16 + 24) / 64)
    # c = 6: it needs 6 segments after the release point: only at the very end (n' = 10)
    assert c6["stopped"] == 0.5 and c6["saved_upper"] == 0.0
    assert json.loads((tmp_path / "a.json").read_text())["rows"][0]["confirm_segments"] == 2
