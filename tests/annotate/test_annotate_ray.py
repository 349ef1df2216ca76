"""`qguard annotate --ray`: the plan and its readers, bad input failing before work, and on a local Ray
cluster: labels equal to single-process annotate row for row, and exactly once when an actor or the
driver is killed mid-run."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from qguard.annotate import FieldMap, annotate
from qguard.data.formats import read_records, read_slice, slices
from qguard.errors import InputError
from tests.conftest import REPO
from tests.engine.test_gen_engine import conversations, trained_gen_checkpoint

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
ray_annotate = pytest.importorskip("qguard.annotate_ray")
annotate_ray = ray_annotate.annotate_ray


def rows(n: int, seed: int = 0) -> list[dict]:
    return [{"id": f"r{i}", "messages": c} for i, c in enumerate(conversations(n, seed))]


def write_jsonl(path: Path, items: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items), "utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def read_parts(out: Path) -> list[dict]:
    """The output folder as one table, in part-name order (what the docs promise readers)."""
    if out.suffix == ".jsonl":
        return [r for p in sorted(out.glob("part-*.jsonl")) for r in read_jsonl(p)]
    return pq.read_table(out).to_pylist()


def plain(g: dict) -> dict:
    """A guard object without the nulls a Parquet struct adds (a category no row of the part has)."""
    return {k: ({c: p for c, p in v.items() if p is not None} if isinstance(v, dict) else v) for k, v in g.items()}


def manifest(out: Path) -> list[dict]:
    return read_jsonl(out / ray_annotate.MANIFEST)


def kill_session(sid: int) -> None:
    """SIGKILL what is left of the processes of session `sid` (a CLI run started with start_new_session:
    the local Ray cluster it started, whose workers put themselves in process groups of their own)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            session = int(stat.read_text().rsplit(")", 1)[1].split()[3])
            if session == sid:
                os.kill(int(stat.parent.name), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ no Ray needed

def _tricky_files(d: Path) -> list[Path]:
    data = [{"prompt": 'two\nlines, "quoted"' if i % 3 == 0 else f"p{i}", "n": str(i)} for i in range(37)]
    lines = []
    for i, r in enumerate(data):
        lines += [json.dumps(r, ensure_ascii=False)] + ([""] if i % 5 == 0 else []) + (['{"torn'] if i % 8 == 0 else [])
    (d / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode())
    with (d / "a.csv").open("w", newline="", encoding="utf-8-sig") as f:
        w = csv.DictWriter(f, ["prompt", "n"])
        w.writeheader()
        for i, r in enumerate(data):
            w.writerow(r)
            if i % 6 == 0:
                f.write("\r\n")  # blank records: DictReader skips them
    (d / "a.json").write_text(json.dumps(data), "utf-8")
    (d / "lines.json").write_text("\n".join(json.dumps(r) for r in data), "utf-8")
    pq.write_table(pa.Table.from_pylist(data), d / "a.parquet", row_group_size=10)
    return [d / n for n in ("a.jsonl", "a.csv", "a.json", "lines.json", "a.parquet")]


def test_slices_read_exactly_what_read_records_reads(tmp_path):
    for path in _tricky_files(tmp_path):
        full = list(read_records(path))
        for size in (1, 4, 7, 1000):
            cut = slices(path, size)
            assert [x for s in cut for x in read_slice(path, s)] == full, (path.name, size)
            assert [s.first for s in cut] == [sum(c.rows for c in cut[:i]) for i in range(len(cut))]
            assert all(0 < s.rows <= size for s in cut)
    assert all(s.rows <= 7 and s.at[0] == (s.first // 10) for s in slices(tmp_path / "a.parquet", 7))  # row groups
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"prompt\nok\n\xff\xfe\n")
    with pytest.raises(InputError, match="not UTF-8"):
        slices(bad, 10)


def test_the_plan_is_stable_and_covers_every_row_once(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "b.jsonl", rows(23, seed=1))
    pq.write_table(pa.Table.from_pylist(rows(9, seed=2)), d / "sub" / "a.parquet")
    write_jsonl(d / "_skip.jsonl", rows(3))  # Spark-style side files are not input
    (d / ".hidden.jsonl").write_text("{}\n", "utf-8")
    (d / "notes.txt").write_text("not data", "utf-8")
    files = ray_annotate.input_files(d)
    assert [f.relative_to(d).as_posix() for f in files] == ["b.jsonl", "sub/a.parquet"]
    shards, inputs = ray_annotate.plan(files, 5)
    assert [i["rows"] for i in inputs] == [23, 9]
    assert [(s.file_no, s.part.first, s.part.rows) for s in shards] == [
        (0, 0, 5), (0, 5, 5), (0, 10, 5), (0, 15, 5), (0, 20, 3), (1, 0, 5), (1, 5, 4)]
    assert [s.index for s in shards] == list(range(7))
    again, _ = ray_annotate.plan(ray_annotate.input_files(d), 5)
    assert [s.to_json() for s in again] == [s.to_json() for s in shards]
    assert [ray_annotate.Shard.from_json(s.to_json()) for s in shards] == shards


def test_the_guard_column_type_has_every_verdict_field():
    from qguard.policy import VERDICT_FIELDS

    assert ray_annotate.guard_arrow_type().names == [*VERDICT_FIELDS, "model"]


def test_parts_of_different_schemas_become_one_table(tmp_path):
    from qguard.data.formats import write_file

    def part(i: int, records: list[dict]) -> Path:
        path = tmp_path / f"part-00000{i}.parquet"
        write_file(path, records, "parquet")
        ray_annotate._mark_json_text(path, records)
        return path

    parts = [part(0, [{"a": None, "b": "x", "c": {"k": 1}, "e": "plain"}]),
             part(1, [{"a": "text", "b": "y", "c": {"j": 2.5}, "e": "t"}, {"e": 5}]),  # e: mixed in this part
             part(2, [{"b": [1, 2], "d": 3}])]  # b: a list here, text elsewhere
    assert ray_annotate._json_text(pq.read_schema(parts[1])) == {"e"}
    for _ in range(2):  # a second pass (finalize again after a kill) changes nothing
        ray_annotate._unify_parquet(parts)
        assert len({pq.read_schema(p) for p in parts}) == 1
        got = pq.read_table(tmp_path).to_pylist()  # the folder reads as one table, in part order
        assert [r["a"] for r in got] == [None, "text", None, None]
        # a column that is JSON text anywhere is JSON text everywhere: json.loads gives every value back
        assert [r["b"] for r in got] == ['"x"', '"y"', None, "[1, 2]"]
        assert [json.loads(r["e"]) if r["e"] else None for r in got] == ["plain", "t", 5, None]
        assert got[0]["c"] == {"k": 1, "j": None} and got[3]["d"] == 3 and got[0]["d"] is None


def test_a_shard_that_kills_its_actor_every_time_stops_the_run(tmp_path):
    # Ray Data retries a dead actor's batch without end: the shard's own count of tries stops that
    from qguard.data.formats import Slice

    worker = object.__new__(ray_annotate.ShardWorker)  # only the try count, no guard
    worker.out = tmp_path
    (tmp_path / ray_annotate.ATTEMPTS).mkdir()
    shard = ray_annotate.Shard(4, 0, "/data/in.jsonl", Slice(100, 50))
    for _ in range(ray_annotate.MAX_ATTEMPTS):
        worker._count_attempt(shard)
    with pytest.raises(ray_annotate.ShardFailedError, match=r"shard 4 \(rows 101-150 of /data/in.jsonl\) was tried 3"):
        worker._count_attempt(shard)
    # the error reaches the user through Ray's wrapping (a RayTaskError chains its cause)
    wrapped = RuntimeError("ray wrapper")
    wrapped.__cause__ = ray_annotate.ShardFailedError("shard 4 ...")
    assert isinstance(ray_annotate._cause(wrapped), ray_annotate.ShardFailedError)
    assert ray_annotate._cause(RuntimeError("no qguard error")) is None


def test_bad_input_fails_before_any_work(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", rows(3))
    out = tmp_path / "out.parquet"
    cases = [
        (tmp_path / "missing.jsonl", out, {}, "no such input file or folder"),
        (tmp_path / "empty", out, {}, "no .jsonl, .json, .csv or .parquet files"),
        (inp, tmp_path / "out.csv", {}, "a Ray run writes a folder of Parquet or JSONL parts"),
        (inp, tmp_path, {}, "must not hold the input"),
        (inp, out, {"filter": "maybe"}, "--filter must be safe or unsafe"),
        (inp, out, {"model": str(tmp_path / "no-such-ckpt")}, "checkpoint .* not found: no such directory"),
        (inp, out, {"address": "nocolon"}, "expected HOST:PORT"),
        (inp, out, {"address": f"127.0.0.1:{free_port()}"}, "no Ray cluster answers at 127.0.0.1:"),
    ]
    (tmp_path / "empty").mkdir()
    for src, dst, kw, msg in cases:
        with pytest.raises(InputError, match=msg):
            annotate_ray(kw.pop("model", "org/model"), src, dst, progress=False, **kw)
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"messages\n\xff\xfe\n")
    with pytest.raises(InputError, match="not UTF-8"):
        annotate_ray("org/model", bad, out, progress=False)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        annotate_ray("org/model", broken, out, progress=False)
    assert not out.exists()  # nothing was started or written
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep me", "utf-8")
    with pytest.raises(InputError, match="not a qguard annotate --ray output"):
        annotate_ray("org/model", inp, tmp_path / "theirs", progress=False, restart=True)
    assert (tmp_path / "theirs" / "notes.txt").exists()


def test_an_address_that_answers_but_is_not_ray_fails_fast(tmp_path):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    import threading

    def speak_http():  # what an HTTP server on the wrong port says to the gRPC preface
        conn, _ = srv.accept()
        conn.recv(64)
        conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=speak_http, daemon=True).start()
    inp = write_jsonl(tmp_path / "in.jsonl", rows(2))
    with pytest.raises(InputError, match="answers, but not as a Ray cluster"):
        annotate_ray("org/model", inp, tmp_path / "o", address=f"127.0.0.1:{port}", progress=False)
    srv.close()


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    from qguard.cli import main

    inp = write_jsonl(tmp_path / "in.jsonl", rows(2))
    assert main(["annotate", str(inp), "-o", str(tmp_path / "o"), "--ray", f"127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err
    assert "qguard: error: no Ray cluster answers at" in err and "Traceback" not in err
    assert main(["annotate", str(inp), "-o", str(tmp_path / "o"), "--ray", "--model", str(tmp_path / "nope")]) == 2
    assert "qguard: error: checkpoint" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["annotate", str(inp), "-o", str(tmp_path / "o.jsonl"), "--actors", "2"]) == 2
    assert "--actors is an option of --ray runs" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ on Ray

@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    for attempt in range(2):  # Ray gives its raylet 30 s to start: a second try on an overloaded machine
        try:
            ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20, logging_level="WARNING")
            break
        except Exception:
            ray.shutdown()
            if attempt:
                raise
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def stream_guard(tiny_stream):
    from qguard.runtime.guard import Guard

    return Guard.from_pretrained(tiny_stream, device="cpu")


def _dataset(tmp_path: Path, n: int, seed: int = 0) -> tuple[Path, list]:
    items: list = rows(n, seed)
    items[7] = {"id": "nomsg", "text": "no conversation here"}
    items[n // 2] = '{"id": "torn'
    items[n - 3] = {"id": "int", "messages": [{"role": "user", "content": 7}]}
    return write_jsonl(tmp_path / "in.jsonl", items), items


def _check_against_single_process(got: list[dict], ref: list[dict]) -> None:
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert {k: v for k, v in a.items() if k != "guard"} == {k: v for k, v in b.items() if k != "guard"}
        ga, gb = plain(a["guard"]), plain(b["guard"])
        for k in ("label", "binary", "action", "categories", "refusal", "unsafe_position", "n_tokens", "error", "model"):
            assert ga.get(k) == gb.get(k), k
        if gb.get("probs"):
            assert ga["probs"] == pytest.approx(gb["probs"], abs=1e-5)


@pytest.mark.slow
def test_2000_rows_on_ray_equal_single_process_annotate(cluster, tiny_stream, stream_guard, tmp_path, capsys):
    inp, items = _dataset(tmp_path, 2000)
    out = tmp_path / "out.parquet"
    s = annotate_ray(str(tiny_stream), inp, out, shard_rows=128, batch_size=32, actors=2)
    bar = capsys.readouterr().err  # the progress bar: rate, ETA, bad rows, shards committed
    assert "row/s" in bar and "<" in bar and "2000/2000" in bar and "errors=3" in bar and "shards=16/16" in bar
    # single-process annotate writing one Parquet file: the same table (a column that one bad row makes
    # mixed, here `messages`, is JSON text in both)
    ref = pq.read_table(_single(stream_guard, inp, tmp_path / "ref.parquet")).to_pylist()
    got = read_parts(out)
    _check_against_single_process(got, ref)
    assert isinstance(got[0]["messages"], str) and json.loads(got[0]["messages"]) == items[0]["messages"]
    assert len({r["guard"]["label"] for r in got if r["guard"]["label"]}) >= 2  # not a constant model
    assert sorted(p.name for p in out.glob("part-*")) == [f"part-{i:06d}.parquet" for i in range(16)]
    assert (s.rows, s.written, s.errors, s.shards, s.resumed_shards) == (2000, 2000, 3, 16, 0)
    errs = read_jsonl(out / ray_annotate.ERRORS)
    assert [(e["file"], e["row"]) for e in errs] == [("in.jsonl", 8), ("in.jsonl", 1001), ("in.jsonl", 1998)]
    want = {}
    for r in ref:
        if r["guard"].get("label"):
            want[r["guard"]["label"]] = want.get(r["guard"]["label"], 0) + 1
    assert s.labels == want and sum(s.categories.values()) == sum(len(r["guard"].get("categories") or []) for r in ref)
    m = manifest(out)
    assert [e["shard"] for e in m[1:-1]] == list(range(16)) and m[-1]["summary"]["complete"] is True
    assert not (out / ray_annotate.ATTEMPTS).exists() and not list(out.glob(".*"))
    # the same command again: nothing to do, the same result; another run into the same folder is refused
    again = annotate_ray(str(tiny_stream), inp, out, shard_rows=128, batch_size=32, actors=2, progress=False)
    assert again.resumed_shards == 16 and again.labels == s.labels and read_parts(out) == got
    with pytest.raises(InputError, match=r"holds another run \(differs in: filter\)"):
        annotate_ray(str(tiny_stream), inp, out, shard_rows=128, filter="safe", progress=False)


def _single(guard, inp: Path, out: Path, **kw) -> Path:
    annotate(guard, inp, out, progress=False, **kw)
    return out


@pytest.mark.slow
def test_gen_filter_csv_in_jsonl_parts_out(cluster, tmp_path):
    from qguard.runtime.guard import Guard

    model = trained_gen_checkpoint(tmp_path / "gen")
    guard = Guard.from_pretrained(model, device="cpu", max_new_tokens=24)
    inp = tmp_path / "in.csv"
    with inp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["q", "a", "note"])
        for i, c in enumerate(conversations(60, seed=11)):
            w.writerow([c[0]["content"], c[-1]["content"] if len(c) > 1 else "", str(i)])
    fields = FieldMap(prompt_field="q", response_field="a")
    out = tmp_path / "unsafe.jsonl"
    s = annotate_ray(lambda: Guard.from_pretrained(model, device="cpu", max_new_tokens=24), inp, out, fields=fields,
                     filter="unsafe", shard_rows=16, batch_size=8, actors=1, progress=False, name="trained-gen")
    ref = read_jsonl(_single(guard, inp, tmp_path / "ref.jsonl", fields=fields, filter="unsafe"))
    everything = read_jsonl(_single(guard, inp, tmp_path / "all.jsonl", fields=fields))
    got = read_parts(out)
    assert [r["note"] for r in got] == [r["note"] for r in ref]
    assert 0 < len(got) < 60 and {r["guard"]["binary"] for r in got} == {"Unsafe"}  # the filter did filter
    _check_against_single_process(got, ref)
    assert s.written == len(ref) and s.rows == 60
    assert s.labels == dict(sorted(Counter(r["guard"]["label"] for r in everything if r["guard"].get("label")).items()))
    assert any(r["guard"]["categories"] for r in got) and s.categories  # Gen's categories, counted


@pytest.mark.slow
def test_an_actor_killed_mid_shard_loses_and_duplicates_nothing(cluster, tiny_stream, stream_guard, tmp_path,
                                                               monkeypatch):
    inp, items = _dataset(tmp_path, 240, seed=3)
    out = tmp_path / "out.parquet"
    marker = tmp_path / "an-actor-died"
    monkeypatch.setenv(ray_annotate.FAULT_ENV, str(marker))
    s = annotate_ray(str(tiny_stream), inp, out, shard_rows=40, batch_size=16, actors=2, progress=False)
    assert marker.exists()  # an actor did os._exit mid-shard, leaving a torn temporary part
    got = read_parts(out)
    assert [r.get("id") for r in got] == [x.get("id") if isinstance(x, dict) else None for x in items]
    _check_against_single_process(got, pq.read_table(_single(stream_guard, inp, tmp_path / "ref.parquet")).to_pylist())
    assert s.rows == 240 and s.shards == 6 and not list(out.glob(".*"))  # the torn part is gone


@pytest.mark.slow
def test_the_driver_killed_mid_run_resumes_exactly_once(tiny_stream, stream_guard, tmp_path):
    inp, items = _dataset(tmp_path, 1000, seed=5)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "qguard", "annotate", str(inp), "-o", str(out), "--model", str(tiny_stream),
           "--ray", "--actors", "1", "--shard-rows", "50", "--batch-size", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # its own group: what Ray leaves behind is reaped below
    try:
        deadline = time.time() + 240
        man = out / ray_annotate.MANIFEST
        while time.time() < deadline and proc.poll() is None:
            if man.exists() and man.read_bytes().count(b"\n") >= 4:  # the header and 3 committed shards
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run finished before it could be killed: {proc.communicate()[1][-3000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kill_session(proc.pid)  # and the local cluster it started: the driver's machine went down
        proc.stdout.close()
        proc.stderr.close()
        data = man.read_bytes()
        committed = [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()[1:]]
        assert 3 <= len(committed) < 20 and "summary" not in committed[-1]
        with man.open("ab") as f:
            f.write(b'{"shard": 19, "part": "part-0000')  # a torn line, as a kill mid-append leaves it
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        kill_session(proc.pid)
    assert r.returncode == 0, r.stderr
    assert f"resumed: {len(committed)} shards" in r.stderr
    got = read_parts(out)
    assert [r.get("id") for r in got] == [x.get("id") if isinstance(x, dict) else None for x in items]
    _check_against_single_process(got, read_jsonl(_single(stream_guard, inp, tmp_path / "ref.jsonl")))
    m = manifest(out)
    assert [e["shard"] for e in m[1:-1]] == list(range(20)) and m[-1]["summary"]["rows"] == 1000
