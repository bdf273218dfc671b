"""Commands sharded over processes (sketchwalk.pipeline.distributed): 2 gloo processes on the
CPU write what 1 process writes, and a partial run resumes under another process count without
redoing finished items."""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest
import torch

from sketchwalk.pipeline import distributed

# ---- the shared machinery, in one process ---------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("count", [0, 1, 4, 5])
def test_shard_deals_every_item_once_in_order(world_size, count):
    items = list(range(count))
    gathered = []
    for rank in range(world_size):
        w = distributed.World(rank, world_size)
        rounds = distributed.shard(items, w)
        assert all(len(r) == world_size for r in rounds)
        if rank == 0:
            gathered = [x for r in rounds for x in r if x is not None]
    print(f"world {world_size}, {count} items -> {gathered}")
    assert gathered == items


def test_single_process_is_a_no_op():
    w = distributed.world()
    assert (w.rank, w.world_size, w.is_main, w.distributed) == (0, 1, True, False)
    assert distributed.all_gather({"a": 1}, w) == [{"a": 1}]
    assert distributed.broadcast({"b"}, w) == {"b"}
    with distributed.session("cpu") as inside:
        assert inside == w
    with pytest.raises(KeyError, match="boom"):
        distributed.on_main(lambda: {}["boom"], w)


def test_an_error_crosses_to_other_ranks_as_itself():
    """Exceptions whose __init__ takes other arguments than their args (here TensorFileError)
    must arrive as the same class and message: the exit code depends on the class."""
    import pickle

    from sketchwalk.blocks import DataError
    from sketchwalk.pipeline.tensorio import TensorFileError

    sent = TensorFileError("/x/tensors.pt", "cannot read .pt file")
    got = pickle.loads(pickle.dumps(distributed._Failed(sent))).error
    print(type(got).__name__, got)
    assert type(got) is TensorFileError and str(got) == str(sent)
    assert (got.path, got.problem) == (sent.path, sent.problem)
    assert isinstance(pickle.loads(pickle.dumps(distributed._Failed(DataError("d")))).error,
                      DataError)  # fmt: skip


# ---- launching ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, argv: list[str], rc_dir: str | None) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from sketchwalk.cli import main

    rc = main(argv)
    if rc_dir is not None:
        with open(os.path.join(rc_dir, f"rank{rank}"), "w") as fh:
            fh.write(str(rc))
    elif rc != 0:
        raise SystemExit(f"rank {rank}: exit code {rc}")


def run_sharded(argv: list[str], world_size: int, rc_dir=None) -> None:
    """``sketchwalk <argv>`` as ``world_size`` gloo processes (what torchrun starts); with
    ``rc_dir`` each rank writes its exit code there instead of failing on a nonzero one."""
    import torch.multiprocessing as mp

    args = (world_size, _free_port(), argv, None if rc_dir is None else str(rc_dir))
    mp.spawn(_worker, args=args, nprocs=world_size, join=True)


def run_single(argv: list[str], expect: int = 0) -> None:
    """``sketchwalk <argv>`` in this process, on one thread as the launched ranks are (the
    thread count changes the order of float sums); its exit code must be ``expect``."""
    from sketchwalk.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == expect
    finally:
        torch.set_num_threads(threads)


# ---- eval ppl -------------------------------------------------------------------------------

PER_LAUNCH = {"wall_s", "rank"}


def _strip(item: dict) -> dict:
    return {k: v for k, v in item.items() if k not in PER_LAUNCH}


@pytest.fixture(scope="module")
def ppl_runs(tmp_path_factory):
    """(eval_ppl.json of 1 process, of 2 processes, the argv without --output_dir)."""
    pytest.importorskip("transformers")
    from test_models import tiny_model_dir

    root = tmp_path_factory.mktemp("ppl")
    model = tiny_model_dir(root / "model", "qwen2", max_position_embeddings=512)
    argv = ["eval", "ppl", "--model_path", str(model), "--backend", "reference",
            "--block_size", "16", "--seq_len", "256", "--text_source", "stdlib",
            "--num_samples", "2", "--selectors", "dense", "sketchwalk", "oracle",
            "--densities", "0.5", "--device", "cpu", "--no_plots", "--no_progress"]  # fmt: skip
    run_single([*argv, "--output_dir", str(root / "one")])
    run_sharded([*argv, "--output_dir", str(root / "two")], 2)
    read = [json.loads((root / d / "eval_ppl.json").read_text()) for d in ("one", "two")]
    return root, read[0], read[1], argv


def test_eval_ppl_two_processes_match_one(ppl_runs):
    root, one, two, _ = ppl_runs
    assert one["settings"]["world_size"] == 1 and two["settings"]["world_size"] == 2
    assert list(one["items"]) == list(two["items"])  # same order
    assert len(one["items"]) == 6
    for key, item in one["items"].items():
        other = two["items"][key]
        print(f"{key}: ppl {item['perplexity']:.6f} vs {other['perplexity']:.6f}")
        assert _strip(item) == _strip(other)
    # both ranks computed, round-robin in item order
    assert [it["rank"] for it in two["items"].values()] == [0, 1, 0, 1, 0, 1]
    assert {it["rank"] for it in one["items"].values()} == {0}
    for name, res in one["results"].items():
        assert {k: v for k, v in res.items() if k != "wall_s"} == {
            k: v for k, v in two["results"][name].items() if k != "wall_s"
        }
    assert (root / "two" / "eval_ppl.md").is_file()
    # only rank 0 wrote: no stray temporary files, nothing but the results
    assert sorted(p.name for p in (root / "two").iterdir()) == ["eval_ppl.json", "eval_ppl.md"]


def test_eval_niah_two_processes_match_one(ppl_runs):
    root = ppl_runs[0]
    argv = ["eval", "niah", "--model_path", str(root / "model"), "--backend", "reference",
            "--block_size", "16", "--seq_lens", "512", "--depths", "0", "100",
            "--text_source", "stdlib", "--selectors", "dense", "sketchwalk", "--densities",
            "0.5", "--decode", "dense", "sketchwalk", "--max_new_tokens", "3", "--device",
            "cpu", "--no_plots", "--no_progress"]  # fmt: skip
    run_single([*argv, "--output_dir", str(root / "niah1")])
    run_sharded([*argv, "--output_dir", str(root / "niah2")], 2)
    one, two = (json.loads((root / d / "eval_niah.json").read_text()) for d in ("niah1", "niah2"))
    assert list(one["items"]) == list(two["items"]) and len(one["items"]) == 6
    for key, item in one["items"].items():
        print(f"{key}: {item['answer']!r} vs {two['items'][key]['answer']!r}")
        assert _strip(item) == _strip(two["items"][key])
    assert [it["rank"] for it in two["items"].values()] == [0, 1] * 3
    decode = [it for it in two["items"].values() if it["run"] == "sketchwalk@0.5+decode"]
    assert all(it["decode_density"] is not None for it in decode)
    for name, res in one["results"].items():
        assert _strip(res) == _strip(two["results"][name])


def test_eval_error_on_rank0_stops_every_rank(ppl_runs, tmp_path, capfd):
    """Rank 0 alone opens the result file; its error (here: the file exists, no --resume)
    reaches every rank, which all exit with the usage code instead of waiting."""
    root, _, _, argv = ppl_runs
    before = (root / "one" / "eval_ppl.json").read_bytes()
    run_sharded([*argv, "--output_dir", str(root / "one")], 2, rc_dir=tmp_path)
    codes = {p.name: p.read_text() for p in tmp_path.iterdir()}
    print(codes)
    assert codes == {"rank0": "2", "rank1": "2"}
    assert "pass --resume to continue it" in capfd.readouterr().err
    assert (root / "one" / "eval_ppl.json").read_bytes() == before


def _truncate(src, dst, keep: int) -> dict:
    """A copy of a finished eval_ppl.json as a run killed after ``keep`` items left it."""
    data = json.loads((src / "eval_ppl.json").read_text())
    data["items"] = dict(list(data["items"].items())[:keep])
    data.pop("results", None)
    dst.mkdir()
    (dst / "eval_ppl.json").write_text(json.dumps(data))
    return data


@pytest.mark.parametrize("first,then", [(1, 2), (2, 1)])
def test_eval_ppl_resumes_under_another_process_count(ppl_runs, first, then):
    root, one, two, argv = ppl_runs
    full = one if first == 1 else two
    out = root / f"resume_{first}_{then}"
    shutil.rmtree(out, ignore_errors=True)
    partial = _truncate(root / ("one" if first == 1 else "two"), out, keep=3)
    args = [*argv, "--output_dir", str(out), "--resume"]
    if then == 1:
        run_single(args)
    else:
        run_sharded(args, then)
    data = json.loads((out / "eval_ppl.json").read_text())
    assert data["settings"]["world_size"] == then
    assert list(data["items"]) == list(full["items"])
    for key, item in partial["items"].items():
        assert data["items"][key] == item  # kept as it was (wall time and rank too): not redone
    new = [data["items"][k] for k in list(data["items"])[3:]]
    # the 3 unfinished items, dealt round-robin over the new process count
    assert [it["rank"] for it in new] == [j % then for j in range(3)]
    for key, item in full["items"].items():
        assert _strip(data["items"][key]) == _strip(item)


# ---- validate, through torchrun -------------------------------------------------------------


def run_torchrun(argv: list[str], world_size: int) -> None:
    """``torchrun --nproc_per_node <world_size> -m sketchwalk <argv>`` on 127.0.0.1."""
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world_size}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "sketchwalk", *argv]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0


def _validation(out) -> tuple[list, dict]:
    (results,) = out.glob("validation_results_*.json")
    (summary,) = out.glob("validation_summary_*.json")
    return json.loads(results.read_text()), json.loads(summary.read_text())


VALIDATE_FLAGS = ["--device", "cpu", "--backend", "reference", "--no_timing", "--block_size",
                  "16", "--top_k_blocks", "4"]  # fmt: skip


@pytest.fixture(scope="module")
def validate_runs(tmp_path_factory):
    """(root, 1-process (records, summary), 2-process (records, summary), argv)."""
    from sketchwalk.testing import write_tensor_dir

    root = tmp_path_factory.mktemp("validate")
    write_tensor_dir(root / "t", seq_len=300, num_layers=4, samples=3)
    argv = ["validate", "--tensor_dir", str(root / "t"), *VALIDATE_FLAGS]
    run_single([*argv, "--output_dir", str(root / "one")])
    run_torchrun([*argv, "--output_dir", str(root / "two")], 2)
    return root, _validation(root / "one"), _validation(root / "two"), argv


def _no_rank(records: list) -> list:
    return [{k: v for k, v in r.items() if k != "rank"} for r in records]


def test_validate_two_processes_match_one(validate_runs):
    root, (rec1, sum1), (rec2, sum2), _ = validate_runs
    assert len(rec1) == 12  # 3 sequences x 4 layers
    print("recall:", [r["attention_recall"] for r in rec1], [r["attention_recall"] for r in rec2])
    assert min(r["density"] for r in rec1) < 0.8  # the selection drops blocks (sparse layers)
    assert _no_rank(rec1) == _no_rank(rec2)  # same records, same order
    # a sequence stays on one rank (the walk runs across its layers): round-robin by sequence
    assert [r["rank"] for r in rec2] == [0] * 4 + [1] * 4 + [0] * 4
    assert {r["rank"] for r in rec1} == {0}
    assert (sum1["world_size"], sum2["world_size"]) == (1, 2)
    per_launch = {"timestamp", "world_size"}
    assert {k: v for k, v in sum1.items() if k not in per_launch} == {
        k: v for k, v in sum2.items() if k not in per_launch
    }
    assert len(list((root / "two").iterdir())) == 2  # rank 0 alone wrote: results + summary


@pytest.mark.parametrize("first,then", [(1, 2), (2, 1)])
def test_validate_resumes_under_another_process_count(validate_runs, first, then):
    root, one, two, argv = validate_runs
    full, _ = one if first == 1 else two
    out = root / f"resume_{first}_{then}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    keep = 5  # the first sequence and one layer of the second: a run killed mid-sequence
    partial = full[:keep]
    (out / "validation_results_20260101_000000.json").write_text(json.dumps(partial))
    args = [*argv, "--output_dir", str(out), "--resume"]
    if then == 1:
        run_single(args)
    else:
        run_torchrun(args, then)
    records, summary = _validation(out)
    assert summary["world_size"] == then and summary["timestamp"] == "20260101_000000"
    assert records[:keep] == partial  # kept as they were, rank included: not redone
    assert _no_rank(records) == _no_rank(full)
    # the unfinished files, by sequence round-robin over the new process count
    seq_rank = [0, 1 % then, 2 % then]
    assert [r["rank"] for r in records[keep:]] == [seq_rank[1]] * 3 + [seq_rank[2]] * 4


def test_validate_error_on_one_rank_stops_every_rank(tmp_path, capfd):
    """A corrupt file in the sequence rank 1 runs: both ranks exit 1 (data error), and the
    results file holds what one process would have finished before it (rank 0's sequence)."""
    import sketchwalk.testing

    tensors = tmp_path / "t"
    paths = sketchwalk.testing.write_tensor_dir(tensors, seq_len=300, num_layers=2, samples=2)
    paths[2].write_bytes(b"not a tensor file")  # sample 1, layer 0
    argv = ["validate", "--tensor_dir", str(tensors), *VALIDATE_FLAGS]
    codes = tmp_path / "codes"
    codes.mkdir()
    run_sharded([*argv, "--output_dir", str(tmp_path / "two")], 2, rc_dir=codes)
    assert {p.name: p.read_text() for p in codes.iterdir()} == {"rank0": "1", "rank1": "1"}
    assert paths[2].name in capfd.readouterr().err
    run_single([*argv, "--output_dir", str(tmp_path / "one")], expect=1)
    (two,) = (tmp_path / "two").glob("validation_results_*.json")
    (one,) = (tmp_path / "one").glob("validation_results_*.json")
    one, two = json.loads(one.read_text()), json.loads(two.read_text())
    assert [r["sample_id"] for r in two] == [p.stem for p in paths[:2]]
    assert _no_rank(one) == _no_rank(two)


# ---- compare ----------------------------------------------------------------------------------


def _comparison(out) -> tuple[list, dict]:
    (results,) = out.glob("comparison_results_*.json")
    (summary,) = out.glob("comparison_summary_*.json")
    return json.loads(results.read_text()), json.loads(summary.read_text())


def _without(value, keys: set):
    """``value`` with the per-launch ``keys`` dropped from every dict inside it."""
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value


COMPARE_PER_LAUNCH = {"rank", "seconds", "timestamp", "world_size"}


@pytest.fixture(scope="module")
def compare_runs(tmp_path_factory):
    """(root, 1-process (records, summary), 2-process (records, summary), argv)."""
    from sketchwalk.testing import write_tensor_dir

    root = tmp_path_factory.mktemp("compare")
    write_tensor_dir(root / "t", seq_len=300, num_layers=3, samples=3)
    argv = ["compare", "--tensor_dir", str(root / "t"), "--device", "cpu", "--block_size", "16",
            "--top_k_blocks", "4", "--visualize", "--max_plots", "2",
            "--selectors", "streaming", "oracle"]  # fmt: skip
    run_single([*argv, "--output_dir", str(root / "one")])
    run_sharded([*argv, "--output_dir", str(root / "two")], 2)
    return root, _comparison(root / "one"), _comparison(root / "two"), argv


def test_compare_two_processes_match_one(compare_runs):
    root, (rec1, sum1), (rec2, sum2), _ = compare_runs
    assert len(rec1) == 9  # 3 sequences x 3 layers
    print("overlap:", [r["block_overlap"] for r in rec1], [r["block_overlap"] for r in rec2])
    assert _without(rec1, COMPARE_PER_LAUNCH) == _without(rec2, COMPARE_PER_LAUNCH)
    # the --selectors fields come through from every rank
    assert all("selector_oracle_recall" in r and "selector_streaming_density" in r for r in rec2)
    assert "selector_oracle_recall" in sum2["sparse_layers"]["overall"]
    assert [r["rank"] for r in rec2] == [0] * 3 + [1] * 3 + [0] * 3  # by sequence
    assert {r["rank"] for r in rec1} == {0}
    assert (sum1["world_size"], sum2["world_size"]) == (1, 2)
    assert _without(sum1, COMPARE_PER_LAUNCH | {"plots"}) == _without(
        sum2, COMPARE_PER_LAUNCH | {"plots"}
    )
    plots = [[p.rsplit("/", 1)[-1].replace(s["timestamp"], "TS") for p in s["plots"]]
             for s in (sum1, sum2)]  # fmt: skip
    assert plots[0] == plots[1] and len(plots[0]) == 3
    names = [sorted(p.name for p in (root / d).iterdir()) for d in ("one", "two")]
    # rank 0 alone wrote: results, summary, the same heatmaps (one drawn from rank 1's sequence)
    assert [n.replace(sum1["timestamp"], "TS") for n in names[0]] == [
        n.replace(sum2["timestamp"], "TS") for n in names[1]
    ]
    assert sum(n.endswith(".png") for n in names[1]) == 3  # 2 files + the summary plot


@pytest.mark.parametrize("first,then", [(1, 2)])
def test_compare_resumes_under_another_process_count(compare_runs, first, then):
    root, one, _, argv = compare_runs
    full, _ = one
    out = root / f"resume_{first}_{then}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    keep = 4  # the first sequence and one layer of the second
    partial = full[:keep]
    (out / "comparison_results_20260101_000000.json").write_text(json.dumps(partial))
    args = [a for a in argv if a not in ("--visualize",)]
    run_sharded([*args, "--output_dir", str(out), "--resume"], then)
    records, summary = _comparison(out)
    assert summary["world_size"] == then and summary["timestamp"] == "20260101_000000"
    assert records[:keep] == partial  # kept as they were: not redone
    assert _without(records, COMPARE_PER_LAUNCH) == _without(full, COMPARE_PER_LAUNCH)
    # sequences are dealt round-robin over the 2 processes (the finished first one too)
    assert [r["rank"] for r in records[keep:]] == [1] * 2 + [0] * 3


# ---- collect ----------------------------------------------------------------------------------

# file_sha256: the files' metadata holds the launch's timestamp, so their bytes differ
COLLECT_PER_LAUNCH = {"rank", "timestamp", "world_size", "seconds", "forward_seconds",
                      "sample_seconds", "load_model_seconds", "file_sha256"}  # fmt: skip


def _collected(out) -> tuple[dict, dict]:
    """({file name without timestamp: tensors and metadata}, {seq_len: summary})."""
    from sketchwalk.pipeline.tensorio import load_tensor_file, parse_tensor_filename

    files, summaries = {}, {}
    for path in sorted(out.iterdir()):
        if path.name.startswith("summary_"):
            data = json.loads(path.read_text())
            summaries[data["seq_len"]] = data
        else:
            parsed = parse_tensor_filename(path)
            key = f"seq{parsed['seq_len']}_layer{parsed['layer_idx']}_sample{parsed['sample']}"
            files[key] = load_tensor_file(path)
    return files, summaries


def _no_stamps(summary: dict) -> dict:
    """A collect summary with the timestamps cut off its file names."""
    samples = [{**x, "files": [f.rsplit("_", 2)[0] for f in x["files"]]}
               for x in summary["samples"]]  # fmt: skip
    return {**summary, "samples": samples}


def _same_tensor_files(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        ra, rb = a[key], b[key]
        assert sorted(ra) == sorted(rb)
        for name in ("Q", "K", "V", "input_ids"):
            assert torch.equal(ra[name], rb[name]), (key, name)
        assert _without(ra["metadata"], {"timestamp"}) == _without(rb["metadata"], {"timestamp"})


@pytest.fixture(scope="module")
def collect_runs(tmp_path_factory):
    pytest.importorskip("transformers")
    from test_models import tiny_model_dir

    root = tmp_path_factory.mktemp("collect")
    model = tiny_model_dir(root / "model", "llama")
    argv = ["collect", "--model_path", str(model), "--sequence_lengths", "64", "80",
            "--num_samples", "2", "--device", "cpu", "--text_source", "stdlib",
            "--dtype", "float32", "--layers", "0", "2", "--block_size", "16",
            "--no_progress"]  # fmt: skip
    run_single([*argv, "--output_dir", str(root / "one")])
    run_sharded([*argv, "--output_dir", str(root / "two")], 2)
    return root, _collected(root / "one"), _collected(root / "two"), argv


def test_collect_two_processes_match_one(collect_runs):
    root, (files1, sum1), (files2, sum2), _ = collect_runs
    assert len(files1) == 8  # 2 lengths x 2 samples x 2 layers
    _same_tensor_files(files1, files2)
    assert sorted(sum1) == sorted(sum2) == [64, 80]
    for seq_len in (64, 80):
        one, two = sum1[seq_len], sum2[seq_len]
        assert (one["world_size"], two["world_size"]) == (1, 2)
        # round-robin over the (length, sample) items: 64/0 -> 0, 64/1 -> 1, 80/0 -> 0, ...
        assert [s["rank"] for s in two["samples"]] == [0, 1]
        assert [s["rank"] for s in one["samples"]] == [0, 0]
        strip = [_without(_no_stamps(s), COLLECT_PER_LAUNCH) for s in (one, two)]
        print(seq_len, strip[0]["layers"][0]["sink_mass"], strip[1]["layers"][0]["sink_mass"])
        assert strip[0] == strip[1]
    # nothing but tensor files and summaries: no temporary files left by either rank
    assert len(list((root / "two").iterdir())) == 8 + 2


def test_collect_resumes_under_another_process_count(collect_runs):
    """A run of 1 process killed after 3 of its 4 samples, resumed under 2 processes: the 3
    finished samples are kept (not rewritten), the last is collected by rank 1."""
    root, (files1, sum1), _, argv = collect_runs
    out = root / "resume"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(root / "one", out)
    for path in out.iterdir():
        if path.name.startswith("summary_") or (
            "seq80_layer" in path.name and "_sample1_" in path.name
        ):
            path.unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert len(kept) == 6
    run_sharded([*argv, "--output_dir", str(out), "--resume"], 2)
    for name, mtime in kept.items():
        assert (out / name).stat().st_mtime_ns == mtime  # not rewritten
    files, summaries = _collected(out)
    _same_tensor_files(files1, files)
    assert [s["resumed"] for s in summaries[64]["samples"]] == [True, True]
    assert [s["resumed"] for s in summaries[80]["samples"]] == [True, False]
    assert summaries[80]["samples"][1]["rank"] == 1 and summaries[80]["world_size"] == 2
    for seq_len in (64, 80):
        assert _without(summaries[seq_len]["layers"], COLLECT_PER_LAUNCH) == _without(
            sum1[seq_len]["layers"], COLLECT_PER_LAUNCH
        )
