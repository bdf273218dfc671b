"""--device_map: parsing, checks, and a model loaded through an explicit per-layer map (every
entry "cpu", given module by module, so the accelerate / device_map path of transformers runs)
computing what the model loaded without a map computes."""

from __future__ import annotations

import json

import pytest
import torch

from sketchwalk.blocks import UsageError
from sketchwalk.hf import device_map as placement


def test_parse_forms():
    assert placement.parse_device_map("auto") == "auto"
    assert placement.parse_device_map('{"model.layers.0": 0, "lm_head": "cpu"}') == {
        "model.layers.0": 0,
        "lm_head": "cpu",
    }
    assert placement.parse_device_map("model.embed_tokens=cpu, model.layers=1,lm_head=disk") == {
        "model.embed_tokens": "cpu",
        "model.layers": 1,
        "lm_head": "disk",
    }
    for bad, why in [("model.layers", "not module=device"), ("{bad json", "not valid JSON"),
                     ("[1, 2]", "must be an object"), ("a=cpu,a=cpu", "given twice"),
                     ("a=warp9", "unknown device"), ("", "empty")]:  # fmt: skip
        with pytest.raises(ValueError, match=why):
            placement.parse_device_map(bad)


def test_cli_refuses_bad_maps_and_torchrun(monkeypatch, capsys):
    from sketchwalk.cli import main

    base = ["eval", "ppl", "--model_path", "nowhere", "--no_progress"]
    assert main([*base, "--device_map", "model.layers"]) == 2
    assert "--device_map" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    for argv in (base, ["collect", "--model_path", "nowhere"], ["train-gate"]):
        assert main([*argv, "--device_map", "auto"]) == 2
        err = capsys.readouterr().err
        print(err)
        assert "--device_map and torchrun with 2 processes do not combine" in err
    assert main(["train-gate"]) == 2  # without a map too: it runs in one process
    assert "train-gate runs in one process" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    assert main([*base, "--device_map", "auto", "--device", "cpu"]) == 2
    assert "give one" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("transformers")
    from test_models import tiny_model_dir

    root = tmp_path_factory.mktemp("device_map")
    return tiny_model_dir(root / "model", "qwen2", max_position_embeddings=512)


def per_layer_map(layers: int = 3) -> dict[str, str]:
    entries = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu"}
    entries.update({f"model.layers.{i}": "cpu" for i in range(layers)})
    return {**entries, "model.norm": "cpu", "lm_head": "cpu"}


def test_explicit_map_gives_the_same_logits(tiny):
    pytest.importorskip("accelerate")
    from sketchwalk.hf.models import load_model

    plain, _, _ = load_model(tiny, device="cpu")
    mapped, _, _ = load_model(tiny, device_map=per_layer_map())
    assert placement.input_device(mapped) == torch.device("cpu")
    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, mapped(ids).logits)


def test_map_errors_name_the_modules(tiny, monkeypatch):
    from sketchwalk.hf.models import load_model

    with pytest.raises(UsageError, match=r"no module named 'model\.layerz\.1'"):
        load_model(tiny, device_map={**per_layer_map(), "model.layerz.1": "cpu"})
    partial = {k: v for k, v in per_layer_map().items() if k != "model.layers.2"}
    with pytest.raises(UsageError, match=r"places no device for model\.layers\.2"):
        load_model(tiny, device_map=partial)
    real = placement.importlib.util.find_spec
    monkeypatch.setattr(
        placement.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "accelerate" else real(name, *a),
    )
    with pytest.raises(UsageError, match="needs the accelerate package"):
        load_model(tiny, device_map="auto")


def test_eval_ppl_through_a_map_matches_no_map(tiny, tmp_path):
    pytest.importorskip("accelerate")
    from sketchwalk.cli import main

    argv = ["eval", "ppl", "--model_path", str(tiny), "--backend", "reference",
            "--block_size", "16", "--seq_len", "128", "--text_source", "stdlib",
            "--num_samples", "1", "--selectors", "dense", "sketchwalk", "--densities", "0.5",
            "--no_plots", "--no_progress"]  # fmt: skip
    assert main([*argv, "--device", "cpu", "--output_dir", str(tmp_path / "plain")]) == 0
    device_map = json.dumps(per_layer_map())
    assert main([*argv, "--device_map", device_map, "--output_dir", str(tmp_path / "map")]) == 0
    plain, mapped = (json.loads((tmp_path / d / "eval_ppl.json").read_text())
                     for d in ("plain", "map"))  # fmt: skip
    assert mapped["environment"]["device_map"] == per_layer_map()
    for name, res in plain["results"].items():
        print(name, res["perplexity"], mapped["results"][name]["perplexity"])
        assert res["perplexity"] == mapped["results"][name]["perplexity"]
    for key, item in plain["items"].items():  # same selections: same per-layer densities
        assert item["layer_density"] == mapped["items"][key]["layer_density"]
    assert min(plain["items"]["sketchwalk@0.5|T128|s0"]["layer_density"]) < 1.0
