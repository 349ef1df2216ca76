"""Dataset annotation on a Ray cluster (`qguard annotate --ray`): single-process annotate's rows
(`qguard.annotate`), judged by a pool of Ray Data actors that each hold one guard, exactly once.

    from qguard.annotate_ray import annotate_ray
    annotate_ray("Qwen/Qwen3Guard-Gen-0.6B", "data/", "out.parquet", actors=8)

OUTPUT is a folder (Parquet parts, or JSONL parts when its name ends in `.jsonl`):

    OUTPUT/part-000000.parquet ...  the annotated rows; part i holds shard i, so the parts in name order
                                    are the input's rows in input order (files in sorted path order)
    OUTPUT/_manifest.jsonl          line 1: the run; then one line per committed shard; once complete,
                                    rewritten in shard order and closed by a summary line
    OUTPUT/_errors.jsonl            bad rows: {"file", "row" (1-based within its file), "error"}

Readers of Parquet folders (pyarrow, pandas, Ray Data, Spark) skip the `_` files. Each row is the row of
single-process annotate: the input record plus its `guard` object (`qguard.annotate.judge_batch`, the same
code), bad rows kept with `guard.error` unless `filter` is given.

Exactly once. The plan cuts every input file into shards of `shard_rows` consecutive rows (never across
a file or a Parquet row group), so a row's key (file, row number) and its shard are the same in every
run of the same command. The ray.data pipeline maps batches of one shard each over an actor pool:
an actor reads its shard's rows (`qguard.data.formats.read_slice`, no re-reading of earlier rows), judges
them `batch_size` at a time, writes the part to a temporary file, fsyncs it and renames it into place.
Only then does the driver append the shard to the manifest (fsynced). A shard is done when the manifest
names it, whatever else is on disk: a part whose actor or driver died before that line is written again,
under the same name, from the same rows. Within a run Ray restarts a dead actor and retries its batch (at
most `MAX_ATTEMPTS` times per shard, so a shard that kills its actor every time stops the run instead of
looping); a re-run of the same command (after the driver died, or the run stopped) drops a torn last
manifest line and maps only the shards the manifest does not name. The finished output therefore holds
every input row once, in input order.

Message content is never logged; reasons name fields, not values.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qguard.annotate import PARTIAL_VERSION, Classifier, FieldMap, Summary, judge_batch, run_policy
from qguard.data.formats import FORMATS, Slice, file_format, read_slice, slices, write_file
from qguard.errors import InputError, QGuardError, check_int
from qguard.policy import VERDICT_FIELDS, Mode
from qguard.taxonomy import CATEGORIES, SEVERITIES

MANIFEST, ERRORS, ATTEMPTS = "_manifest.jsonl", "_errors.jsonl", "_attempts"
LAYOUT_VERSION = 1  # of the output folder and its manifest
MAX_ATTEMPTS = 3  # tries of one shard within a run (a dead actor's batch is retried by Ray)
OUTPUT_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl"}
# Tests only: the path of a marker file. The first actor that creates it dies (os._exit) in the middle of
# its shard, after the first engine batch and a torn temporary part: what a killed or OOM-killed worker
# leaves behind. Read by the driver and handed to the actors.
FAULT_ENV = "QGUARD_TEST_RAY_ACTOR_EXIT_ONCE"

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ the plan

@dataclass(frozen=True)
class Shard:
    """Rows [first, first + rows) of input file `file_no`: the unit of work, of commit and of retry."""

    index: int
    file_no: int
    path: str
    part: Slice

    def to_json(self) -> str:
        return json.dumps({"index": self.index, "file_no": self.file_no, "path": self.path,
                           "part": asdict(self.part)})

    @classmethod
    def from_json(cls, text: str) -> Shard:
        d = json.loads(text)
        return cls(d["index"], d["file_no"], d["path"], Slice(**d["part"]))


def input_files(input: str | os.PathLike) -> list[Path]:
    """A file, or every file of a known type under a folder (sorted by path; names starting with `.` or
    `_`, such as Spark's `_SUCCESS`, are skipped like Parquet readers skip them)."""
    p = Path(input)
    if p.is_file():
        file_format(p)
        return [p]
    if not p.is_dir():
        raise InputError(f"no such input file or folder: {p}")
    found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in FORMATS
                   and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts))
    if not found:
        raise InputError(f"{p}: no .jsonl, .json, .csv or .parquet files in this folder")
    return found


def plan(files: list[Path], shard_rows: int) -> tuple[list[Shard], list[dict[str, Any]]]:
    """Every file cut into shards (one read of each file: an unreadable one fails here, before any
    work), and each file's identity for the manifest."""
    shards: list[Shard] = []
    inputs = []
    for k, f in enumerate(files):
        cut = slices(f, shard_rows)
        inputs.append({"path": str(f.resolve()), "size": f.stat().st_size, "rows": sum(s.rows for s in cut)})
        shards += [Shard(len(shards) + j, k, str(f.resolve()), s) for j, s in enumerate(cut)]
    return shards, inputs


def check_model(name: str) -> None:
    """Refuse, before Ray starts, a checkpoint that cannot be loaded anywhere: not a local directory and
    not shaped like a hub id (the rule of `qguard.weights.resolve`, which each actor applies)."""
    p = Path(name).expanduser()
    if p.is_dir():
        return
    if p.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise InputError(f"checkpoint {name!r} not found: no such directory (looked in {Path.cwd()}), and not a hub "
                         "id like 'Qwen/Qwen3Guard-Gen-0.6B'; with --ray, give a path every node sees")


def output_format(out: Path) -> str:
    suffix = out.suffix.lower()
    if suffix in OUTPUT_FORMATS:
        return OUTPUT_FORMATS[suffix]
    if suffix in FORMATS:
        raise InputError(f"{out}: a Ray run writes a folder of Parquet or JSONL parts; name OUTPUT *.parquet, "
                         "*.jsonl or a folder (Parquet)")
    return "parquet"


def part_name(index: int, n_shards: int, fmt: str) -> str:
    return f"part-{index:0{max(6, len(str(n_shards - 1)))}d}.{fmt}"  # name order = shard order


# ------------------------------------------------------------------------------------------ the guard column

def guard_arrow_type():
    """One Arrow type for every part's `guard` column (inferred per part, a column of nulls in one part
    and of text in another would give the parts different schemas)."""
    import pyarrow as pa

    f64, text = pa.float64(), pa.string()
    return pa.struct([
        ("label", text), ("binary", text), ("mode", text), ("action", text), ("categories", pa.list_(text)),
        ("refusal", pa.bool_()), ("probs", pa.struct([(s.value, f64) for s in SEVERITIES])),
        ("category_probs", pa.struct([(c.value, f64) for c in CATEGORIES])), ("refusal_prob", f64),
        ("unsafe_position", pa.int64()), ("n_tokens", pa.int64()), ("error", text), ("raw_output", text),
        ("model", text)])


GUARD_KEYS = frozenset((*VERDICT_FIELDS, "model"))
_PROB_KEYS = {"probs": frozenset(s.value for s in SEVERITIES), "category_probs": frozenset(c.value for c in CATEGORIES)}


def _fits_guard_type(records: list[dict]) -> bool:
    """Whether every `guard` object has only the keys of `guard_arrow_type` (Arrow would drop others)."""
    for r in records:
        g = r.get("guard")
        if not isinstance(g, dict) or not g.keys() <= GUARD_KEYS:
            return False
        for k, keys in _PROB_KEYS.items():
            if g.get(k) is not None and not (isinstance(g[k], dict) and g[k].keys() <= keys):
                return False
    return True


# ------------------------------------------------------------------------------------------ the actors

def durable_replace(tmp: Path, path: Path) -> None:
    """Rename a written and closed `tmp` over `path` so that both survive a power cut: data, then the
    name (the folder)."""
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWorker:
    """A Ray Data actor: one guard, loaded once; each call judges and writes whole shards."""

    def __init__(self, model: str | Callable[[], Classifier], out: str, fmt: str, n_shards: int,
                 fields: FieldMap, filter: str | None, mode: str, batch_size: int, fault: str | None = None):
        if isinstance(model, str):
            from qguard.runtime.guard import Guard

            self.classifier = Guard.from_pretrained(model)
        else:
            self.classifier = model()
        self.policy = run_policy(self.classifier, Mode(mode))
        self.out, self.fmt, self.n_shards = Path(out), fmt, n_shards
        self.fields, self.filter, self.batch_size, self.fault = fields, filter, batch_size, fault

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        done = [json.dumps(self.shard(Shard.from_json(s))) for s in batch["shard"]]
        return {"result": np.array(done, dtype=object)}

    def shard(self, shard: Shard) -> dict[str, Any]:
        self._count_attempt(shard)
        t0 = time.perf_counter()
        rows = list(read_slice(Path(shard.path), shard.part))
        if len(rows) != shard.part.rows:
            raise InputError(f"{shard.path} changed during the run (shard {shard.index} expected "
                             f"{shard.part.rows} rows from row {shard.part.first + 1}, found {len(rows)})")
        items: list[dict] = []
        t1 = time.perf_counter()
        for i in range(0, len(rows), self.batch_size):
            batch = [(shard.part.first + i + j + 1, rec, err) for j, (rec, err) in enumerate(rows[i:i + self.batch_size])]
            items += judge_batch(self.classifier, batch, self.fields, self.filter, self.policy)
            self._maybe_die(shard)
        t2 = time.perf_counter()
        kept = [it["record"] for it in items if it["keep"]]
        name = part_name(shard.index, self.n_shards, self.fmt) if kept else None
        if name is not None:
            tmp = self.out / f".{name}.{uuid.uuid4().hex}.tmp"  # unique: never two writers on one file
            write_file(tmp, kept, self.fmt, {"guard": guard_arrow_type()} if self.fmt == "parquet"
                       and _fits_guard_type(kept) else None)
            if self.fmt == "parquet":
                _mark_json_text(tmp, kept)
            durable_replace(tmp, self.out / name)
        judged = [it["record"]["guard"] for it in items if it["error"] is None]
        return {"shard": shard.index, "part": name, "rows": len(items), "written": len(kept),
                "judge_s": round(t2 - t1, 4), "io_s": round(t1 - t0 + time.perf_counter() - t2, 4),
                "model": self.classifier.name,
                "labels": dict(Counter(g["label"] for g in judged)),
                "categories": dict(Counter(c for g in judged for c in g["categories"])),
                "errors": [{"row": it["row"], "error": it["error"]} for it in items if it["error"] is not None]}

    def _count_attempt(self, shard: Shard) -> None:
        # one byte per try, in a file per shard (appends are atomic): a shard that kills its actor every
        # time must stop the run, not be retried forever (Ray Data retries a dead actor's batch unboundedly)
        path = self.out / ATTEMPTS / str(shard.index)
        with path.open("ab") as f:
            f.write(b".")
        tries = path.stat().st_size
        if tries > MAX_ATTEMPTS:
            raise ShardFailedError(f"shard {shard.index} (rows {shard.part.first + 1}-{shard.part.first + shard.part.rows} "
                                   f"of {shard.path}) was tried {MAX_ATTEMPTS} times and its actor died each "
                                   "time (out of memory?)")

    def _maybe_die(self, shard: Shard) -> None:
        if not self.fault:
            return
        try:
            os.close(os.open(self.fault, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        name = part_name(shard.index, self.n_shards, self.fmt)
        (self.out / f".{name}.{uuid.uuid4().hex}.tmp").write_bytes(b"PAR1 torn")
        os._exit(1)


# A Parquet part's own record of its columns that hold JSON text (values of mixed types: every value
# json.dumps'd, as in a single-file annotate): in the file, so that `_unify_parquet` can be re-run after
# a kill without encoding a column twice.
JSON_TEXT_KEY = b"qguard_json_text"


def _json_text(schema) -> set[str]:
    return set(json.loads((schema.metadata or {}).get(JSON_TEXT_KEY, b"[]")))


def _mark_json_text(path: Path, records: list[dict]) -> None:
    """Record in the part which of its text columns are JSON text (the writer fell back to it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = [f.name for f in pq.read_schema(path) if pa.types.is_string(f.type)
            and any(not isinstance(r.get(f.name), str | None) for r in records)]
    if cols:
        t = pq.read_table(path)
        pq.write_table(t.replace_schema_metadata({**(t.schema.metadata or {}), JSON_TEXT_KEY: json.dumps(cols)}), path)


class ShardFailedError(QGuardError):
    """A shard whose actor died `MAX_ATTEMPTS` times."""


# ------------------------------------------------------------------------------------------ the manifest

@dataclass
class RaySummary(Summary):
    """`Summary` of a Ray run; `error_rows` are "file:row" (the first few), `categories` counts judged
    rows per category."""

    error_rows: list[str] = field(default_factory=list)  # type: ignore[assignment]
    categories: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    resumed_shards: int = 0
    actors: int = 0
    files: int = 0
    wall_s: float = 0.0


def _read_manifest(path: Path) -> tuple[dict | None, dict[int, dict], dict | None]:
    """(run header, committed shards by index, summary when complete); repairs a torn last line."""
    if not path.exists():
        return None, {}, None
    data = path.read_bytes()
    if not data.endswith(b"\n"):  # the driver died mid-append: that shard is not committed
        data = data[: data.rfind(b"\n") + 1]
        with path.open("r+b") as f:
            f.truncate(len(data))
    lines = data.splitlines()
    try:
        header = json.loads(lines[0])["qguard_annotate_ray"]
        entries = [json.loads(line) for line in lines[1:]]
    except (IndexError, ValueError, KeyError, TypeError):
        raise InputError(f"{path} is not a qguard annotate --ray manifest; pass --restart to start over") from None
    done = {e["shard"]: e for e in entries if "shard" in e}
    final = next((e["summary"] for e in entries if "summary" in e), None)
    return header, done, final


class Manifest:
    """The append-only commit log: a shard is done once its line is on disk."""

    def __init__(self, path: Path):
        self.path = path
        self.f = path.open("a", encoding="utf-8")

    def commit(self, entry: dict) -> None:
        self.f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def _prepare_output(out: Path, run: dict, restart: bool) -> dict[int, dict]:
    """The shards already committed to `out` by this same run (none for a new one)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; a Ray run writes a folder of parts: remove it or choose another name")
    man = out / MANIFEST
    if out.is_dir() and any(out.iterdir()) and not man.exists():
        raise InputError(f"{out} is a folder that is not a qguard annotate --ray output; choose a new or empty one")
    if restart:
        _clear(out)
    header, done, _ = _read_manifest(man)
    if header is not None and header != run:
        diff = sorted(k for k in header.keys() | run.keys() if header.get(k) != run.get(k))
        raise InputError(f"{out} holds another run (differs in: {', '.join(diff)}); re-run its own command to "
                         "continue it, or pass --restart to start this one over")
    try:
        (out / ATTEMPTS).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the output folder {out} ({e.strerror})") from None
    for tmp in out.glob(".part-*.tmp"):  # torn parts of dead actors: never named by the manifest
        tmp.unlink(missing_ok=True)
    for f in (out / ATTEMPTS).iterdir():  # a new run is a new budget of tries
        f.unlink()
    if header is None:
        with (out / MANIFEST).open("w", encoding="utf-8") as f:
            f.write(json.dumps({"qguard_annotate_ray": run}) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return done


def _clear(out: Path) -> None:
    """Remove what a Ray run writes (and nothing else) from `out`."""
    if not out.is_dir():
        return
    for f in out.iterdir():
        ours = f.name in (MANIFEST, ERRORS) or (f.name.startswith(("part-", ".part-")) and f.is_file())
        if f.name == ATTEMPTS:
            shutil.rmtree(f)
        elif ours:
            f.unlink()


# ------------------------------------------------------------------------------------------ Ray

def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at `address` (None: $RAY_ADDRESS, else a new local cluster); True when this
    call started Ray (and so must shut it down). A cluster already joined by the caller is used as is.
    An address that does not answer fails in seconds with InputError, before any work."""
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray Data: pip install 'qguard[ray]'") from None
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address not in ("auto", "local"):
        _check_reachable(address)
    kw: dict[str, Any] = {"logging_level": logging.WARNING}
    if not address or address == "local":  # "local": always a new cluster, never one found on this machine
        kw.update(address="local", num_cpus=num_cpus, include_dashboard=False)
    else:
        kw.update(address=address)
    try:
        ray.init(**kw)
    except Exception as e:  # ConnectionError, a version mismatch, a bad auth token, ...
        where = f"at {address}" if address else "(a new local cluster)"
        hint = ""
        if kw["address"] not in ("local", "auto") and "RAY_AUTH_MODE" not in os.environ:
            # Ray sends its token to an explicit address only when told to (`ray start` turns token auth on)
            hint = ("; if the cluster uses token authentication (the default of `ray start`), set "
                    "RAY_AUTH_MODE=token, with its token in ~/.ray/auth_token or $RAY_AUTH_TOKEN")
        raise InputError(f"cannot join the Ray cluster {where}: {type(e).__name__}: {_first_line(e)}{hint}") from None
    return True


# An HTTP/2 client preface and an empty SETTINGS frame: every gRPC server (Ray's GCS, the Ray Client
# server) answers with a SETTINGS frame. ray.init on a port where something else listens waits minutes.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise InputError(f"--ray: expected HOST:PORT, ray://HOST:PORT or auto, got {address!r}")
    hint = "start one with `ray start --head` or check the address"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            if os.environ.get("RAY_USE_TLS", "0") in ("0", ""):  # (under TLS the first bytes are its handshake)
                sock.sendall(_H2_PREFACE)
                head = sock.recv(9)
                if len(head) < 4 or head[3] != 4:
                    raise InputError(f"{address} answers, but not as a Ray cluster (no gRPC server there); {hint}")
    except OSError as e:
        raise InputError(f"no Ray cluster answers at {address} ({e.strerror or e}); {hint}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def pool_size(actors: int | None, gpus_per_actor: float | None) -> tuple[int, float]:
    """(actors, GPUs per actor): one actor per GPU when the cluster has GPUs, else one per CPU."""
    import ray

    res = ray.cluster_resources()
    gpus = gpus_per_actor if gpus_per_actor is not None else (1.0 if res.get("GPU", 0) >= 1 else 0.0)
    if gpus < 0:
        raise InputError(f"gpus_per_actor must be >= 0, got {gpus}")
    if gpus and res.get("GPU", 0) < gpus:
        raise InputError(f"the Ray cluster has {res.get('GPU', 0):g} GPUs, fewer than the {gpus:g} one actor needs")
    if actors is None:
        actors = int(res.get("GPU", 0) // gpus) if gpus else max(1, int(res.get("CPU", 1)))
    return check_int(actors, "actors"), gpus


def _cause(e: BaseException) -> QGuardError | None:
    """The qguard error behind a Ray error (a RayTaskError is raised as an instance of its cause)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, QGuardError):
            return e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


# ------------------------------------------------------------------------------------------ the run

def annotate_ray(model: str | Callable[[], Classifier], input: str | os.PathLike, output: str | os.PathLike, *,
                 fields: FieldMap = FieldMap(), mode: Mode | str = Mode.STRICT, filter: str | None = None,
                 batch_size: int = 64, shard_rows: int = 1024, actors: int | None = None,
                 gpus_per_actor: float | None = None, address: str | None = None, restart: bool = False,
                 progress: bool = True, name: str | None = None, num_cpus: int | None = None) -> RaySummary:
    """Annotate every row of `input` (a file or a folder of files) into the folder `output` on Ray (see
    the module docstring); returns the run's summary.

    `model`: a checkpoint (path or hub id, loaded by `Guard.from_pretrained` in each actor), or a
    picklable function that builds a classifier in an actor (the CLI's: Guard or the vLLM backend with
    its options). `name` identifies the model in the manifest (default: `model` itself, or the
    function's name): a re-run continues only the same run. `actors` (default: one per GPU, else one per
    CPU of the cluster) x `gpus_per_actor` (default 1 when the cluster has GPUs, else 0). `address`:
    None ($RAY_ADDRESS, else a new local cluster of `num_cpus`), "auto", HOST:PORT or ray://HOST:PORT; a
    Ray already initialised by the caller is used as it is.
    """
    if not isinstance(fields, FieldMap):
        raise InputError(f"fields must be a qguard.annotate.FieldMap, got {type(fields).__name__}")
    mode, batch_size, shard_rows = Mode(mode), check_int(batch_size, "batch_size"), check_int(shard_rows, "shard_rows")
    if filter not in (None, "safe", "unsafe"):
        raise InputError("--filter must be safe or unsafe")
    if actors is not None:
        check_int(actors, "actors")
    files, out = input_files(input), Path(output)
    fmt = output_format(out)
    for f in files:
        if out.resolve() == f.resolve() or out.resolve() in f.resolve().parents:
            raise InputError(f"OUTPUT {out} must not hold the input ({f})")
    if Path(input).is_dir() and Path(input).resolve() in (out.resolve(), *out.resolve().parents):
        raise InputError(f"OUTPUT {out} must not be inside the input folder {input} (a re-run would read it)")
    if isinstance(model, str):
        check_model(model)
    if address and address not in ("auto", "local"):
        _check_reachable(address)  # before reading every input file
    t0 = time.monotonic()
    shards, inputs = plan(files, shard_rows)  # unreadable input fails here, before Ray starts
    model_id = name or (model if isinstance(model, str) else getattr(model, "__qualname__", repr(model)))
    run = {"version": LAYOUT_VERSION, "row_version": PARTIAL_VERSION, "inputs": inputs, "output": str(out.resolve()),
           "format": fmt, "model": model_id, "mode": mode.value, "filter": filter, "fields": asdict(fields),
           "shard_rows": shard_rows, "shards": len(shards)}
    done = _prepare_output(out, run, restart)
    resumed = dict(done)
    todo = [s for s in shards if s.index not in done]
    n_actors = 0
    if todo:
        started = connect(address, num_cpus)
        try:
            n_actors, gpus = pool_size(actors, gpus_per_actor)
            _run(model, todo, shards, out, fmt, fields, filter, mode, batch_size, min(n_actors, len(todo)), gpus,
                 done, progress)
        finally:
            if started:
                import ray

                ray.shutdown()
    return finalize(out, run, shards, done, resumed, files, actors=n_actors, wall_s=time.monotonic() - t0)


def _run(model, todo: list[Shard], shards: list[Shard], out: Path, fmt: str, fields: FieldMap,
         filter: str | None, mode: Mode, batch_size: int, n_actors: int, gpus: float, done: dict[int, dict],
         progress: bool) -> None:
    import ray.data
    from tqdm import tqdm

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours below counts rows; Ray Data's count blocks
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no INFO line per execution
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    total = sum(s.part.rows for s in shards)
    bar = tqdm(total=total, initial=sum(e["rows"] for e in done.values()), unit="row", file=sys.stderr,
               disable=not progress, dynamic_ncols=True, smoothing=0.05)
    errors = sum(len(e["errors"]) for e in done.values())
    bar.set_postfix(errors=errors, shards=f"{len(done)}/{len(shards)}")
    ds = ray.data.from_items([{"shard": s.to_json()} for s in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        ShardWorker, batch_size=1, num_cpus=1, num_gpus=gpus or None,
        compute=ray.data.ActorPoolStrategy(size=n_actors, max_tasks_in_flight_per_actor=2),
        fn_constructor_kwargs={"model": model, "out": str(out.resolve()), "fmt": fmt, "n_shards": len(shards),
                               "fields": fields, "filter": filter, "mode": mode.value, "batch_size": batch_size,
                               "fault": os.environ.get(FAULT_ENV) or None})
    manifest = Manifest(out / MANIFEST)
    try:
        for row in ds.iter_rows():
            entry = {**json.loads(row["result"]), "at": round(time.time(), 3)}
            manifest.commit(entry)  # the part is durable (the actor fsynced it): now it counts
            done[entry["shard"]] = entry
            errors += len(entry["errors"])
            bar.update(entry["rows"])
            bar.set_postfix(errors=errors, shards=f"{len(done)}/{len(shards)}")
    except Exception as e:
        cause = _cause(e)
        why = str(cause) if cause is not None else f"{type(e).__name__}: {_first_line(e)}"
        raise QGuardError(f"the Ray run stopped: {why}. {len(done)} of {len(shards)} shards are committed in "
                          f"{out}: re-run the same command to continue from them") from None
    finally:
        manifest.close()
        bar.close()


def finalize(out: Path, run: dict, shards: list[Shard], done: dict[int, dict], resumed: dict[int, dict],
             files: list[Path], actors: int = 0, wall_s: float = 0.0) -> RaySummary:
    """Check that every shard is committed and its part is whole, give the Parquet parts one schema, write
    the errors file, and rewrite the manifest in shard order with the summary (idempotent: a re-run after
    a kill here does it again)."""
    missing = [s.index for s in shards if s.index not in done]
    if missing:
        raise QGuardError(f"{len(missing)} shards of {out} are not committed (first: {missing[0]}); re-run the "
                          "same command to finish them")
    entries = [done[s.index] for s in shards]
    models = {e["model"] for e in entries}
    if len(models) > 1:
        raise InputError(f"the parts of {out} come from different models ({', '.join(sorted(models))}); pass --restart")
    for e in entries:
        if e["part"] is not None and _part_rows(out / e["part"], run["format"]) != e["written"]:
            raise InputError(f"{out / e['part']} is missing or changed since it was committed; pass --restart")
    if run["format"] == "parquet":
        _unify_parquet([out / e["part"] for e in entries if e["part"] is not None])
    root = Path(os.path.commonpath([str(f.resolve().parent) for f in files]))
    errs = [{"file": str(Path(s.path).relative_to(root)), "row": x["row"], "error": x["error"]}
            for s, e in zip(shards, entries) for x in e["errors"]]
    ep = out / ERRORS
    if errs:
        tmp = out / f".{ERRORS}.tmp"
        tmp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in errs), "utf-8")
        durable_replace(tmp, ep)
    elif ep.exists():
        ep.unlink()
    labels, cats = Counter(), Counter()
    for e in entries:
        labels.update(e["labels"])
        cats.update(e["categories"])
    s = RaySummary(rows=sum(e["rows"] for e in entries), written=sum(e["written"] for e in entries), errors=len(errs),
                   resumed_from=sum(e["rows"] for e in resumed.values()), labels=dict(sorted(labels.items())),
                   error_rows=[f"{x['file']}:{x['row']}" for x in errs[:20]], output=str(out),
                   errors_file=str(ep) if errs else None,
                   error_reasons=dict(Counter(x["error"] for x in errs).most_common(5)),
                   categories=dict(cats.most_common()), shards=len(shards), resumed_shards=len(resumed),
                   files=len(files), actors=actors, wall_s=round(wall_s, 3))
    tmp = out / f".{MANIFEST}.tmp"
    body = {k: v for k, v in s.to_dict().items() if k not in ("error_rows", "output", "errors_file")}
    tmp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in
                           [{"qguard_annotate_ray": run}, *entries, {"summary": {**body, "complete": True}}]), "utf-8")
    durable_replace(tmp, out / MANIFEST)
    shutil.rmtree(out / ATTEMPTS, ignore_errors=True)
    for stray in out.glob(".part-*.tmp"):  # torn parts of actors that died (no actor of this run is left)
        stray.unlink(missing_ok=True)
    return s


def _unify_parquet(parts: list[Path]) -> None:
    """Give every part the same schema, so that the folder reads as one table. A column that is all null
    in one part takes the type it has in the others (Arrow's permissive promotion). A column that is JSON
    text in one part (its values had mixed types there), or whose types cannot be unified (text in one
    part, a list in another), becomes JSON text in every part: the rule a single Parquet file of
    `qguard annotate` follows within its rows, so `json.loads` reads every value of it back. Idempotent."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    read = [pq.read_schema(p) for p in parts]
    done = [_json_text(s) for s in read]
    schemas = [s.remove_metadata() for s in read]
    names = list(dict.fromkeys(n for s in schemas for n in s.names))
    as_text = set().union(*done) if done else set()
    for n in names:
        try:
            pa.unify_schemas([pa.schema([s.field(n)]) for s in schemas if n in s.names], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            as_text.add(n)
    fixed = [pa.schema([pa.field(n, pa.string()) if n in as_text else s.field(n) for n in s.names]) for s in schemas]
    target = pa.unify_schemas(fixed, promote_options="permissive")
    target = pa.schema([target.field(n) for n in names])
    marked = target.with_metadata({JSON_TEXT_KEY: json.dumps(sorted(as_text))}) if as_text else target
    for p, s, was in zip(parts, schemas, done):
        encode = (as_text & set(s.names)) - was
        if s == target and not encode:
            continue
        t = pq.read_table(p)
        cols = []
        for f in target:
            if f.name not in t.column_names:
                cols.append(pa.nulls(t.num_rows, f.type))
            elif f.name in encode:
                cols.append(pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str)
                                      for v in t.column(f.name).to_pylist()], pa.string()))
            else:
                cols.append(t.column(f.name).cast(f.type))
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")
        pq.write_table(pa.Table.from_arrays(cols, schema=marked), tmp)
        durable_replace(tmp, p)


def _part_rows(path: Path, fmt: str) -> int | None:
    """Rows in a part (None: no such file); unchanged by `_unify_parquet`."""
    if not path.is_file():
        return None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_metadata(path).num_rows
    with path.open("rb") as f:
        return sum(1 for _ in f)


__all__ = ["ERRORS", "FAULT_ENV", "MANIFEST", "RaySummary", "ShardWorker", "annotate_ray", "connect", "finalize",
           "input_files", "plan"]
