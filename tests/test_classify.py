"""classify.py and teachers.py: label parsing, voting, agreement, resume after a crash, HTTP retries.

HTTP tests talk to real stdlib servers on 127.0.0.1 started inside the test (no mocked HTTP).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import classify
from lorapar.data import DataError
from lorapar.teachers import HttpTeacher, TeacherArgs, TeacherError, fleiss_kappa, majority_vote, parse_label

REPO = Path(__file__).resolve().parents[1]


def gsm8k_rows(n: int) -> list[dict]:
    """Row i has i % 5 + 1 calculator steps, so rule:gsm8k-steps thresholds split them predictably."""
    rows = []
    for i in range(n):
        steps = i % 5 + 1
        lines = [f"Step {k}: {k}+{i} = <<{k}+{i}={k + i}>>{k + i}." for k in range(steps)]
        rows.append({"question": f"Question {i}?", "answer": "\n".join(lines) + f"\n#### {i}"})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    "reply,label",
    [
        ("System 1", 1),
        ("system-2.", 2),
        ("**System2**", 2),
        ("2", 2),
        (" 1. ", 1),
        ("It needs System 2 thinking", 2),
        ("Not System 1.\nAnswer: System 2", 2),
        ("System 1 or System 2", None),
        ("I cannot tell", None),
        ("", None),
        ("System 12", None),
    ],
)
def test_parse_label(reply, label):
    assert parse_label(reply) == label


def test_majority_vote_abstentions_and_ties():
    assert majority_vote([2], default=1) == (2, "majority")
    assert majority_vote([1, 2, 2], default=1) == (2, "majority")
    assert majority_vote([1, 1, 2, 2, 1], default=2) == (1, "majority")
    assert majority_vote([None, None, 1], default=2) == (1, "majority")
    assert majority_vote([None, 1, 2], default=2) == (2, "tie")
    assert majority_vote([None, None, None], default=1) == (1, "all-abstain")


def test_fleiss_kappa_by_hand():
    # Per-item agreement 1, 1, 1/3, 1/3 -> P = 2/3; both categories half the votes -> Pe = 1/2; kappa = 1/3.
    assert fleiss_kappa([(1, 1, 1), (2, 2, 2), (1, 1, 2), (1, 2, 2)]) == pytest.approx(1 / 3)
    assert fleiss_kappa([(1, 1), (2, 2), (None, 1)]) == pytest.approx(1.0)  # the incomplete row is left out
    assert fleiss_kappa([(1,), (2,)]) is None and fleiss_kappa([(1, 1), (1, 1)]) is None


@pytest.mark.parametrize("thresholds", [[3], [2, 3, 5], [1, 2, 3, 5, 6]])
def test_vote_with_1_3_5_teachers(tmp_path, thresholds):
    data = write_rows(tmp_path / "in.jsonl", gsm8k_rows(10))
    out = tmp_path / "out.jsonl"
    teachers = [f"rule:gsm8k-steps,threshold={t}" for t in thresholds]
    summary = classify.main(["--data", str(data), "--out", str(out), *sum((["--teacher", t] for t in teachers), [])])
    rows = read_out(out)
    assert len(rows) == 10 and summary["rows"] == 10
    for i, row in enumerate(rows):
        steps = i % 5 + 1
        votes = [2 if steps >= t else 1 for t in thresholds]
        assert row["votes"] == votes and row["teachers"] == teachers
        assert row["system"] == (2 if votes.count(2) > len(votes) / 2 else 1) and row["decided_by"] == "majority"
        assert row["question"] == f"Question {i}?" and row["format"] == "gsm8k"
    assert summary["system_2"] == sum(r["system"] == 2 for r in rows)
    assert [t["system_2"] for t in summary["teachers"]] == [sum(i % 5 + 1 >= t for i in range(10)) for t in thresholds]
    assert json.loads((tmp_path / "out.summary.json").read_text())["rows"] == 10


@pytest.mark.parametrize("default", [1, 2])
def test_abstentions_all_abstain_default_and_reference(tmp_path, default):
    rows = gsm8k_rows(6)
    for i in (0, 1):
        rows[i]["system"] = 2 - i  # two rows carry a known label; rule:oracle abstains on the others
    data = write_rows(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    summary = classify.main(
        [
            "--data",
            str(data),
            "--out",
            str(out),
            "--default-system",
            str(default),
            "--teacher",
            "rule:oracle",
            "--teacher",
            "rule:oracle",
            "--teacher",
            "rule:oracle",
        ]
    )
    labelled = read_out(out)
    assert [r["system"] for r in labelled] == [2, 1] + [default] * 4
    assert [r["decided_by"] for r in labelled] == ["majority"] * 2 + ["all-abstain"] * 4
    assert labelled[0]["reference_system"] == 2 and "reference_system" not in labelled[2]
    assert summary["abstentions"] == 12 and summary["teachers"][0]["abstained"] == 4
    assert summary["reference_accuracy"] == 1.0 and summary["kappa_rows"] == 2


def test_even_teacher_count_needs_allow_even(tmp_path, capsys):
    data = write_rows(tmp_path / "in.jsonl", gsm8k_rows(5))
    argv = [
        "--data",
        str(data),
        "--out",
        str(tmp_path / "o.jsonl"),
        "--teacher",
        "rule:gsm8k-steps,threshold=2",
        "--teacher",
        "rule:gsm8k-steps,threshold=4",
    ]
    with pytest.raises(SystemExit):
        classify.main(argv)
    assert "even number" in capsys.readouterr().err
    classify.main(argv + ["--allow-even", "--default-system", "1"])
    rows = read_out(tmp_path / "o.jsonl")  # steps 1..5: votes (1,1), (2,1), (2,1), (2,2), (2,2)
    assert [r["system"] for r in rows] == [1, 1, 1, 2, 2] and rows[1]["decided_by"] == "tie"


def test_resume_after_truncated_last_line_matches_uninterrupted(tmp_path):
    data = write_rows(tmp_path / "in.jsonl", gsm8k_rows(12))
    teachers = [
        "--teacher",
        "rule:gsm8k-steps",
        "--teacher",
        "rule:length,threshold=12",
        "--teacher",
        "rule:gsm8k-steps,threshold=4",
    ]
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    classify.main(["--data", str(data), "--out", str(full), "--batch-size", "5", *teachers])
    expected = full.read_bytes()
    lines = expected.splitlines(keepends=True)
    part.write_bytes(b"".join(lines[:7]) + lines[7][: len(lines[7]) // 2])  # a crash in the middle of row 8
    classify.main(["--data", str(data), "--out", str(part), "--batch-size", "5", *teachers])
    assert part.read_bytes() == expected
    full_summary = (tmp_path / "full.summary.json").read_text()
    assert (tmp_path / "part.summary.json").read_text() == full_summary.replace("full.jsonl", "part.jsonl")
    classify.main(["--data", str(data), "--out", str(part), "--batch-size", "5", *teachers])  # nothing left to do
    assert part.read_bytes() == expected


def test_resume_refuses_foreign_or_corrupt_output(tmp_path):
    data = write_rows(tmp_path / "in.jsonl", gsm8k_rows(4))
    out = tmp_path / "out.jsonl"
    classify.main(["--data", str(data), "--out", str(out), "--teacher", "rule:gsm8k-steps"])
    with pytest.raises(DataError, match=r"out\.jsonl:1: labelled by teachers"):
        classify.main(["--data", str(data), "--out", str(out), "--teacher", "rule:length"])
    other = write_rows(tmp_path / "other.jsonl", gsm8k_rows(5)[1:])
    with pytest.raises(DataError, match=r"out\.jsonl:1: row_id .* is not in this input"):
        classify.main(["--data", str(other), "--out", str(out), "--teacher", "rule:gsm8k-steps"])
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + "{oops\n" + "".join(lines[2:]))
    with pytest.raises(DataError, match=r"out\.jsonl:2: not a classify.py output row"):
        classify.main(["--data", str(data), "--out", str(out), "--teacher", "rule:gsm8k-steps"])


def test_malformed_input_names_the_line_or_is_skipped(tmp_path):
    rows = [json.dumps(r) for r in gsm8k_rows(3)]
    data = tmp_path / "in.jsonl"
    data.write_text(rows[0] + "\n" + '{"question": "no answer"}\n' + rows[1] + "\n")
    argv = ["--data", str(data), "--out", str(tmp_path / "o.jsonl"), "--teacher", "rule:gsm8k-steps"]
    with pytest.raises(DataError, match=r"in\.jsonl:2: .*'answer'"):
        classify.main(argv)
    assert classify.main(argv + ["--skip-bad"])["skipped_input_lines"] == 1
    clash = write_rows(tmp_path / "clash.jsonl", [{**gsm8k_rows(1)[0], "votes": []}])
    with pytest.raises(DataError, match=r"clash\.jsonl:1: input field\(s\) \['votes'\]"):
        classify.main(["--data", str(clash), "--out", str(tmp_path / "c.jsonl"), "--teacher", "rule:gsm8k-steps"])


def test_every_flag_has_help():
    for action in classify.build_parser()._actions:
        assert action.help and action.help.strip(), action.dest


# ----------------------------------------------------------------------------- real HTTP servers


class ScriptedServer:
    """A chat-completions server on a free loopback port: `failures` 500s first, then answers.

    The answer is "System 2" when the prompt's reference answer has a 3rd step line, else "System 1";
    each reply takes `delay` seconds.
    """

    def __init__(self, failures: int = 0, delay: float = 0.0, status: int = 500):
        self.failures, self.delay, self.status, self.requests = failures, delay, status, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append((self.path, self.headers.get("Authorization"), body))
                if owner.failures > 0:
                    owner.failures -= 1
                    payload, status = b'{"error": "scripted failure"}', owner.status
                else:
                    time.sleep(owner.delay)
                    content = "System 2" if "Step 2:" in body["messages"][0]["content"] else "System 1"
                    payload, status = json.dumps({"choices": [{"message": {"content": content}}]}).encode(), 200
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted():
    servers = []

    def start(**kwargs):
        servers.append(ScriptedServer(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_http_teacher_survives_a_500_then_succeeds(tmp_path, scripted, monkeypatch):
    server = scripted(failures=1)
    monkeypatch.setenv("LORAPAR_TEST_KEY", "sekrit")
    data = write_rows(tmp_path / "in.jsonl", gsm8k_rows(1)[:1] + gsm8k_rows(3)[2:])
    out = tmp_path / "out.jsonl"
    classify.main(
        [
            "--data",
            str(data),
            "--out",
            str(out),
            "--teacher",
            f"http:{server.url}#teacher-model",
            "--backoff",
            "0.01",
            "--api-key-env",
            "LORAPAR_TEST_KEY",
            "--concurrency",
            "1",
        ]
    )
    rows = read_out(out)
    assert [r["votes"] for r in rows] == [[1], [2]] and [r["replies"] for r in rows] == [["System 1"], ["System 2"]]
    assert len(server.requests) == 3  # one 500, then one request per row
    path, auth, body = server.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sekrit" and body["model"] == "teacher-model"
    assert body["messages"][0]["content"].startswith("Act as LLaMA-2-7B.")


def test_http_teacher_gives_up_and_does_not_retry_client_errors(scripted):
    args = TeacherArgs(retries=2, backoff=0.01)
    always_failing = scripted(failures=100)
    with pytest.raises(TeacherError, match="gave up after 3 attempts; last error HTTP 500"):
        HttpTeacher(always_failing.url, "m", args).complete("hi")
    assert len(always_failing.requests) == 3
    wrong_key = scripted(failures=100, status=401)
    with pytest.raises(TeacherError, match="HTTP 401 \\(the API key was refused"):
        HttpTeacher(wrong_key.url + "/v1", "m", args).complete("hi")
    assert len(wrong_key.requests) == 1


@pytest.mark.parametrize("status", [400, 413, 422])
def test_a_request_specific_4xx_is_that_rows_abstention_with_the_message_kept(tmp_path, scripted, status):
    server = scripted(failures=1, status=status)  # the first row's request is refused, the rest answered
    data = write_rows(tmp_path / "in.jsonl", gsm8k_rows(3))
    out = tmp_path / "out.jsonl"
    summary = classify.main(
        [
            "--data",
            str(data),
            "--out",
            str(out),
            "--teacher",
            f"http:{server.url}#m",
            "--concurrency",
            "1",
            "--batch-size",
            "1",
            "--backoff",
            "0.01",
        ]
    )
    rows = read_out(out)
    assert len(rows) == 3 and rows[0]["votes"] == [None] and all(r["votes"] != [None] for r in rows[1:])
    reply = rows[0]["replies"][0]
    assert reply.startswith(f"refused by the server: HTTP {status}") and "scripted failure" in reply
    assert summary["teachers"][0]["refused"] == 1 and summary["abstentions"] == 1
    assert len(server.requests) == 3  # refused once, not retried


@pytest.mark.parametrize("status, hint", [(401, "API key"), (403, "may not use"), (404, "check the URL")])
def test_a_wrong_key_url_or_model_stops_the_run_at_once(tmp_path, scripted, status, hint):
    server = scripted(failures=100, status=status)
    data = write_rows(tmp_path / "in.jsonl", gsm8k_rows(3))
    with pytest.raises(TeacherError, match=f"HTTP {status}.*{hint}"):
        classify.main(
            [
                "--data",
                str(data),
                "--out",
                str(tmp_path / "out.jsonl"),
                "--teacher",
                f"http:{server.url}#m",
                "--concurrency",
                "1",
                "--backoff",
                "0.01",
            ]
        )
    assert len(server.requests) == 1


def test_a_second_run_into_the_same_out_is_refused_naming_the_holder(tmp_path):
    from lorapar import runlock

    data = write_rows(tmp_path / "in.jsonl", gsm8k_rows(4))
    out = tmp_path / "out.jsonl"
    holder = subprocess.Popen(  # another process holds the lock, as a running classify.py would
        [
            sys.executable,
            "-c",
            "import sys, time; from lorapar import runlock; "
            "runlock.acquire(sys.argv[1], is_dir=False); print('held', flush=True); time.sleep(60)",
            str(out),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runlock.RunLocked, match=f"in use by process {holder.pid}"):
            classify.main(["--data", str(data), "--out", str(out), "--teacher", "rule:length"])
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    classify.main(["--data", str(data), "--out", str(out), "--teacher", "rule:length"])  # stale lock: taken over
    assert len(read_out(out)) == 4


def test_duplicate_rows_from_concurrent_runs_are_detected(tmp_path):
    data = write_rows(tmp_path / "in.jsonl", gsm8k_rows(2))
    out = tmp_path / "out.jsonl"
    classify.main(["--data", str(data), "--out", str(out), "--teacher", "rule:length"])
    out.write_text(out.read_text() * 2)  # what two unlocked runs appending at once produced
    with pytest.raises(DataError, match="out.jsonl:3: row_id .* appears twice"):
        classify.main(["--data", str(data), "--out", str(out), "--teacher", "rule:length"])


def test_resume_after_killed_subprocess_matches_uninterrupted(tmp_path, scripted):
    server = scripted(delay=0.15)
    data = write_rows(tmp_path / "in.jsonl", gsm8k_rows(14))
    args = ["--data", str(data), "--teacher", f"http:{server.url}#m", "--batch-size", "1"]
    killed = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "classify.py"), *args, "--out", str(killed)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while (not killed.exists() or killed.read_text().count("\n") < 3) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = killed.read_text().count("\n")
    assert 3 <= done < 14, "the run was not killed midway"
    classify.main([*args, "--out", str(killed)])
    full = tmp_path / "full.jsonl"
    classify.main([*args, "--out", str(full)])
    assert killed.read_bytes() == full.read_bytes()
    assert [r["system"] for r in read_out(full)] == [2 if i % 5 + 1 >= 3 else 1 for i in range(14)]
