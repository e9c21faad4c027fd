"""fastopd/integrations/served_teacher.py: the teacher on a vLLM server (docs/integrations.md, "A teacher on a
vLLM server").

Three groups:

- the parser on a response recorded from vLLM 0.32.0 (``data/vllm_prompt_logprobs_k5.json``), against the
  in-process demo teacher, and on hand-made edge cases (ties, int keys, malformed answers): always run;
- the client's failures against a local stub HTTP server (retries on dropped connections, timeouts, wrong model,
  server down): always run;
- against a live vLLM server with the demo teacher, only when ``FASTOPD_VLLM_URL`` is set (``.ci/run`` starts one):
  served log-probs and margins against the in-process teacher's exact ones on the demo's long task, the
  exact-margin share at k = 5 and 20, the loss, and the failures a user meets.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import fastopd
from fastopd import reference
from fastopd.integrations.served_teacher import (
    ServedTeacher,
    TeacherServerError,
    parse_prompt_logprobs,
    rollout_sequences,
    served_completion_loss,
)
from fastopd.served import served_opd_loss

RECORDED = Path(__file__).parent / "data" / "vllm_prompt_logprobs_k5.json"
VLLM_URL = os.environ.get("FASTOPD_VLLM_URL")
live = pytest.mark.skipif(
    not VLLM_URL,
    reason="FASTOPD_VLLM_URL is not set: no vLLM teacher server to test against (.ci/run starts one; "
    "docs/integrations.md says how)",
)


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastopd.demo.task import demo_asset_paths

    paths = demo_asset_paths()
    tok = AutoTokenizer.from_pretrained(paths.tokenizer)
    student = AutoModelForCausalLM.from_pretrained(paths.student).eval()
    teacher = AutoModelForCausalLM.from_pretrained(paths.teacher).eval()
    return paths, tok, student, teacher


# ----------------------------------------------------------------------------------------------------------
# The parser
# ----------------------------------------------------------------------------------------------------------


def test_parser_on_a_recorded_vllm_response_matches_the_in_process_teacher(demo):
    _, _, _, teacher = demo
    rec = json.loads(RECORDED.read_text())
    ids, p = rec["request"]["prompt"], rec["prompt_length"]
    plp = rec["response"]["choices"][0]["prompt_logprobs"]
    assert plp[0] is None
    u, top_ids, top_lp = parse_prompt_logprobs(plp, ids, p, 5)
    assert len(u) == len(ids) - p and all(len(t) == 5 for t in top_ids)
    with torch.no_grad():
        lp = torch.log_softmax(teacher(torch.tensor([ids])).logits[0, :-1].float(), -1)  # row j predicts ids[j+1]
    rows = lp[p - 1:]
    want_u = rows.gather(-1, torch.tensor(ids[p:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(u), want_u, rtol=0, atol=1e-4)
    want_lp, want_ids = torch.topk(rows, 5, -1)
    assert torch.equal(torch.tensor(top_ids), want_ids)
    torch.testing.assert_close(torch.tensor(top_lp), want_lp, rtol=0, atol=1e-4)
    # positions with k + 1 entries are those whose token is outside the teacher's top-5 (vLLM adds it)
    for j in range(p, len(ids)):
        extra = len(plp[j]) == 6
        assert extra == (ids[j] not in want_ids[j - p].tolist())
        if extra:
            assert plp[j][str(ids[j])]["rank"] > 5


def test_parser_edge_cases():
    # the prompt's token ties with the 5th: vLLM gives both rank 5 and sends 6 entries; the top-k excludes it
    pos = {str(i): {"logprob": -float(i), "rank": i} for i in (1, 2, 3, 4, 5)}
    pos["9"] = {"logprob": -5.0, "rank": 5}
    u, ids, lps = parse_prompt_logprobs([None, pos], [0, 9], 1, 5)
    assert u == [-5.0] and ids == [[1, 2, 3, 4, 5]] and lps == [[-1.0, -2.0, -3.0, -4.0, -5.0]]
    # the token inside the top-k: k entries; int keys (an in-process dict) and bare numbers are accepted
    u, ids, lps = parse_prompt_logprobs([None, {3: -0.5, 7: -1.5}], [1, 7], 1, 2)
    assert u == [-1.5] and ids == [[3, 7]]
    # fewer entries than k (a vocabulary smaller than k): kept as they are, the client pads with -1
    u, ids, lps = parse_prompt_logprobs([None, {"3": {"logprob": -0.1}}], [1, 3], 1, 5)
    assert ids == [[3]]
    # -Infinity (JSON) and vLLM's -9999 clamp are log-probs like any other
    u, ids, lps = parse_prompt_logprobs([None, {"3": {"logprob": -math.inf}, "4": {"logprob": -9999.0}}], [1, 3], 1, 2)
    assert u == [-math.inf] and ids == [[4, 3]]
    with pytest.raises(TeacherServerError, match="does not hold the prompt's token 8"):
        parse_prompt_logprobs([None, {"3": {"logprob": -0.1}}], [1, 8], 1, 5)
    with pytest.raises(TeacherServerError, match="prompt_logprobs for 1 positions, expected 2"):
        parse_prompt_logprobs([None], [1, 8], 1, 5)
    with pytest.raises(TeacherServerError, match=r"prompt_logprobs\[1\] is None"):
        parse_prompt_logprobs([None, None], [1, 8], 1, 5)
    with pytest.raises(TeacherServerError, match="holds no number"):
        parse_prompt_logprobs([None, {"8": {"logprob": "x"}}], [1, 8], 1, 5)
    with pytest.raises(ValueError, match="start must be >= 1"):
        parse_prompt_logprobs([None, {}], [1, 8], 0, 5)


# ----------------------------------------------------------------------------------------------------------
# The client against a stub server (no vLLM)
# ----------------------------------------------------------------------------------------------------------


class _Stub:
    """A local HTTP server that answers like vLLM from the recorded response; it can drop the first
    ``drop`` connections of /v1/completions without answering, or sleep ``delay`` seconds first."""

    def __init__(self, drop: int = 0, delay: float = 0.0, status: int = 200):
        rec = json.loads(RECORDED.read_text())
        self.model = rec["request"]["model"]
        self.prompt, self.response = rec["request"]["prompt"], rec["response"]
        self.drop, self.delay, self.status, self.hits = drop, delay, status, 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout test)
                    pass

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": stub.model, "max_model_len": 320}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.hits += 1
                if stub.hits <= stub.drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                time.sleep(stub.delay)
                if stub.status != 200:
                    self._send(stub.status, {"error": {"message": "overloaded", "code": stub.status}})
                elif body.get("model") != stub.model:
                    self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
                else:
                    self._send(200, stub.response)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub_factory():
    made = []

    def make(**kw):
        made.append(_Stub(**kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


_HELD: list = []  # sockets bound and never listening: a connection to their port is refused for the whole session


@pytest.fixture(scope="module", autouse=True)
def _close_held_ports():
    yield
    while _HELD:
        _HELD.pop().close()


def _closed_port() -> int:
    """A port nothing listens on: bound here and kept (not listening), so no other process (a vLLM server starting
    its engine beside the tests) can take it between this call and the connection the test expects refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _HELD.append(s)
    return s.getsockname()[1]


def _one_line(err: BaseException) -> str:
    msg = str(err)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def test_client_parses_and_pads_and_retries_dropped_connections(stub_factory):
    stub = stub_factory(drop=2)
    c = ServedTeacher(stub.url, k=5, retries=3, backoff=0.01)
    p = json.loads(RECORDED.read_text())["prompt_length"]
    out = c.score([stub.prompt], [p], width=len(stub.prompt) - p + 3)
    assert out.requests == 3 and stub.hits == 3  # two dropped, the third answered
    n = len(stub.prompt) - p
    assert out.valid[0, :n].all() and not out.valid[0, n:].any()
    assert (out.topk_ids[0, n:] == -1).all() and torch.isinf(out.topk_logprobs[0, n:]).all()
    assert out.token_logprobs[0, n:].eq(0).all()
    u, ids, _ = parse_prompt_logprobs(stub.response["choices"][0]["prompt_logprobs"], stub.prompt, p, 5)
    assert torch.equal(out.token_logprobs[0, :n], torch.tensor(u)) and torch.equal(out.topk_ids[0, :n], torch.tensor(ids))


def test_client_failures_are_one_clear_line(stub_factory):
    p = json.loads(RECORDED.read_text())["prompt_length"]
    # down: a closed port, bounded retries
    t0 = time.perf_counter()
    with pytest.raises(TeacherServerError, match=r"cannot reach the teacher server .* after 3 tries .*Connection") as e:
        ServedTeacher(f"http://127.0.0.1:{_closed_port()}", retries=2, backoff=0.01)
    assert time.perf_counter() - t0 < 5
    _one_line(e.value)
    # dropped more often than retried
    stub = stub_factory(drop=10)
    c = ServedTeacher(stub.url, k=5, retries=1, backoff=0.01)
    with pytest.raises(TeacherServerError, match="after 2 tries") as e:
        c.score([stub.prompt], [p])
    _one_line(e.value)
    # 503 is retried, then reported
    stub = stub_factory(status=503)
    with pytest.raises(TeacherServerError, match="HTTP 503: overloaded") as e:
        ServedTeacher(stub.url, k=5, retries=1, backoff=0.01).score([stub.prompt], [p])
    assert stub.hits == 2
    # timeout: not retried
    stub = stub_factory(delay=1.0)
    with pytest.raises(TeacherServerError, match=r"did not answer within timeout=0.2 s") as e:
        ServedTeacher(stub.url, k=5, timeout=0.2).score([stub.prompt], [p])
    assert stub.hits == 1
    _one_line(e.value)
    # another model
    stub = stub_factory()
    with pytest.raises(TeacherServerError, match=r"serves \['fastopd/assets/demo/teacher'\], not the expected model 'other'"):
        ServedTeacher(stub.url, model="other")
    # bad options and inputs name the argument
    with pytest.raises(ValueError, match="url must be an http"):
        ServedTeacher("127.0.0.1:8000")
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        ServedTeacher(stub.url, k=0)
    c = ServedTeacher(stub.url, k=5, vocab_size=10)
    with pytest.raises(ValueError, match=r"prompt_lengths\[0\] must lie in"):
        c.score([[1, 2]], [0])
    with pytest.raises(ValueError, match=r"sequences\[0\] holds ids outside \[0, 10\)"):
        c.score([[1, 20]], [1])
    with pytest.raises(TeacherServerError, match="max_model_len is 320"):
        c.score([[1] * 320], [1])


# ----------------------------------------------------------------------------------------------------------
# Against a live vLLM server (FASTOPD_VLLM_URL)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_rollouts(demo):
    """16 rollouts of the demo's long task (8 held-out prompts x 2) from the shipped student, segmented, with
    both models' completion logits."""
    from fastopd.demo.task import read_jsonl
    from fastopd.train.rollouts import add_segments, completion_logits, eos_ids_of, generate_completions

    paths, tok, student, teacher = demo
    torch.manual_seed(0)
    rows = read_jsonl(paths.root / "data" / "long_eval.jsonl")[:8]
    ro = generate_completions(student, tok, [r["prompt"] for r in rows for _ in range(2)],
                              eos_ids=eos_ids_of(tok, student), max_new_tokens=192, do_sample=True)
    add_segments(ro, tok)
    with torch.no_grad():
        zs, zt = completion_logits(student, ro), completion_logits(teacher, ro)
    return ro, zs, zt


@pytest.fixture(scope="module")
def served(demo, long_rollouts):
    _, tok, _, _ = demo
    ro = long_rollouts[0]
    seqs, plens = rollout_sequences(ro)
    out = {}
    for k in (5, 20):
        client = ServedTeacher(VLLM_URL, k=k, tokenizer=tok, timeout=120)
        out[k] = client.score(seqs, plens, width=ro.targets.shape[1])
    return out


@live
def test_served_logprobs_equal_the_in_process_teachers(long_rollouts, served):
    ro, _, zt = long_rollouts
    lt = torch.log_softmax(zt.float(), -1)
    valid = ro.targets != -100
    for k, s in served.items():
        assert torch.equal(s.valid, valid)
        u = lt.gather(-1, ro.targets.clamp_min(0)[..., None])[..., 0]
        torch.testing.assert_close(s.token_logprobs[valid], u[valid], rtol=0, atol=1e-4)
        vals, ids = torch.topk(lt, k + 1, -1)
        torch.testing.assert_close(s.topk_logprobs[valid], vals[..., :k][valid], rtol=0, atol=1e-4)
        clear = (vals[..., k - 1] - vals[..., k] > 1e-3) & valid  # no near-tie at the k-th: the same set
        assert torch.equal(s.topk_ids.sort(-1).values[clear], ids[..., :k].sort(-1).values[clear])


@live
def test_served_margins_and_exact_share_equal_the_in_process_ones(long_rollouts, served):
    ro, zs, zt = long_rollouts
    valid = ro.targets != -100
    ref = reference.token_stats(zs, zt, ro.targets, k=16, return_topk=True)
    lt = torch.log_softmax(zt.float(), -1)
    for k, s in served.items():
        out = served_opd_loss(zs, ro.targets, s.token_logprobs, s.topk_ids, s.topk_logprobs, k=16)
        ex = out.margin_exact
        torch.testing.assert_close(out.stats.margins[ex], ref.margins[ex], rtol=0, atol=2e-4)
        # the in-process sparse margins from the teacher's own top-k: the same exact share, up to near-ties
        vals, ids = torch.topk(lt, k, -1)
        inproc = fastopd.sparse_margins(ref.topk_ids, ids, vals)
        share_in = float((inproc.exact & valid).sum()) / float(valid.sum())
        assert out.metrics["margin_exact_share"] == pytest.approx(share_in, abs=2e-3)
        assert 0 < out.metrics["margin_exact_share"] <= 1
    assert served[20].valid.sum() > 0
    assert (served_opd_loss(zs, ro.targets, *_tensors(served[20]), k=16).metrics["margin_exact_share"]
            >= served_opd_loss(zs, ro.targets, *_tensors(served[5]), k=16).metrics["margin_exact_share"])


def _tensors(s):
    return s.token_logprobs, s.topk_ids, s.topk_logprobs


@live
def test_served_completion_loss_with_the_rule_equals_the_in_process_loss(demo, long_rollouts):
    _, tok, student, teacher = demo
    ro, _, zt = long_rollouts
    client = ServedTeacher(VLLM_URL, k=20, tokenizer=tok, timeout=120)
    student.zero_grad()
    times = {}
    out = served_completion_loss(client, student, ro, loss="pg", rule=fastopd.ReleaseRule(k=16), times=times)
    out.loss.backward()
    g_served = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    from fastopd.train.rollouts import completion_logits

    ref = fastopd.OPDLoss("pg", rule=fastopd.ReleaseRule(k=16))(completion_logits(student, ro), zt, ro.targets,
                                                                segment_ids=ro.segment_ids)
    ref.loss.backward()
    # the rule's decisions from sparse margins (bounds where not exact) equal the exact ones on this batch
    same = ref.release.release_segment == out.release.release_segment
    assert same.mean() >= 0.9, same
    if same.all():
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=1e-5)
        for a, b in zip(g_served, (p.grad for p in student.parameters())):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert out.metrics["teacher_latency_s"] > 0 and times["teacher"] > 0
    assert out.metrics["teacher_requests"] == ro.targets.shape[0]
    assert "accept_rate" in out.metrics and "margin_exact_share" in out.metrics


@live
def test_live_failures_are_one_clear_line(demo):
    _, tok, _, _ = demo
    with pytest.raises(TeacherServerError, match="not the expected model 'Qwen/Qwen3-8B'") as e:
        ServedTeacher(VLLM_URL, model="Qwen/Qwen3-8B")
    _one_line(e.value)
    with pytest.raises(TeacherServerError, match=r"refuses token id 999 of the student's vocabulary of 1000") as e:
        ServedTeacher(VLLM_URL, tokenizer=tok, vocab_size=1000)
    _one_line(e.value)

    class Shifted:  # a student tokenizer of another vocabulary: every id decodes as its neighbour
        def __len__(self):
            return len(tok)

        def decode(self, ids):
            return tok.decode([(i + 1) % len(tok) for i in ids])

    with pytest.raises(TeacherServerError, match="has another vocabulary: token id") as e:
        ServedTeacher(VLLM_URL, tokenizer=Shifted())
    _one_line(e.value)
    c = ServedTeacher(VLLM_URL, k=5, timeout=1e-4, check=False)
    with pytest.raises(TeacherServerError, match="did not answer within timeout") as e:
        c.score([[1, 2, 3]], [1])
    _one_line(e.value)
    with pytest.raises(TeacherServerError, match=r"cannot reach the teacher server") as e:
        ServedTeacher(f"http://127.0.0.1:{_closed_port()}", retries=1, backoff=0.01)
    _one_line(e.value)
    c = ServedTeacher(VLLM_URL, k=25, check=True)
    with pytest.raises(TeacherServerError, match="greater than max allowed: 20") as e:
        c.score([[1, 2, 3]], [1])
    _one_line(e.value)


@live
def test_the_docs_example_trains_the_demo_student_against_the_server(monkeypatch, capsys):
    import re

    doc = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
    block = re.search(r"<!-- runnable: served -->\n```python\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S)
    monkeypatch.setenv("FASTOPD_VLLM_URL", VLLM_URL)
    torch.manual_seed(0)
    exec(compile(block.group(1), "integrations.md:served", "exec"), {"__name__": "__doc_example__"})
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln[:2] in ("0 ", "1 ")]
    assert len(lines) == 2 and all("margin_exact_share" in ln and "accept_rate" in ln for ln in lines)


# ----------------------------------------------------------------------------------------------------------
# fastopd train with teacher: http://... (docs/training.md, docs/integrations.md)
# ----------------------------------------------------------------------------------------------------------


def _served_config(out: Path, url: str, **kw):
    from fastopd.demo.task import demo_asset_paths
    from fastopd.train.config import TrainConfig

    paths = demo_asset_paths()
    base = dict(student=str(paths.student), teacher=url, tokenizer=str(paths.tokenizer),
                train_data=str(Path(paths.student).parent / "data" / "long_train.jsonl"), output_dir=str(out),
                steps=2, prompts_per_step=2, num_samples=2, max_new_tokens=200, lr=5e-4, progress=False,
                log_with="none", num_threads=1, eval_at_start=False, loss="pg", teacher_topk=20)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("kw, message", [
    (dict(loss="forward_kl"), "use loss forward_kl_topk"),
    (dict(loss="reverse_kl"), "use loss reverse_kl_topk"),
    (dict(mode="online"), "sampler online runs the teacher in this process"),
    (dict(mode="sft"), "sampler teacher runs the teacher in this process"),
    (dict(loss_temperature=2.0), "loss_temperature must be 1"),
])
def test_a_served_teacher_refuses_what_it_cannot_give_in_one_line(tmp_path, kw, message):
    cfg = _served_config(tmp_path / "run", "http://127.0.0.1:1", **kw)
    with pytest.raises(ValueError, match=message) as e:
        cfg.validate()
    _one_line(e.value)


def test_a_top_k_loss_needs_a_served_teacher(tmp_path):
    from fastopd.demo.task import demo_asset_paths

    cfg = _served_config(tmp_path / "run", str(demo_asset_paths().teacher), loss="forward_kl_topk")
    with pytest.raises(ValueError, match="with the teacher in this process use the exact forward_kl"):
        cfg.validate()


def test_fastopd_train_against_a_server_that_is_down_is_one_line_and_makes_no_folder(tmp_path, capsys):
    from fastopd.cli import main

    out = tmp_path / "run"
    cfg = _served_config(out, f"http://127.0.0.1:{_closed_port()}")
    args = ["train", "--student", cfg.student, "--teacher", cfg.teacher, "--tokenizer", cfg.tokenizer,
            "--train-data", cfg.train_data, "--output-dir", str(out), "--steps", "1", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and cfg.teacher in err[0], err
    assert not out.exists()


@live
def test_fastopd_train_two_steps_against_the_server_with_the_release_rule(tmp_path):
    """Two steps of the demo student on the long task, the teacher's log-probs from the live server: the rule
    reads the served margins (exact share logged), and the loss is pg (exact)."""
    from fastopd.train.runlog import read_log
    from fastopd.train.trainer import train

    out = tmp_path / "run"
    summary = train(_served_config(out, VLLM_URL, log_rollouts=True))
    rows = read_log(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and summary["step"] == 2
    for r in rows:
        assert r["margin_exact_share"] > 0.9 and r["teacher_latency_s"] > 0 and r["time_teacher"] > 0
        assert math.isfinite(r["loss"]) and r["tokens"] > 0
    assert sum(r["accept_rate"] for r in rows) > 0  # the rule released some long-task rollouts
    assert (out / "final" / "model.safetensors").is_file()
