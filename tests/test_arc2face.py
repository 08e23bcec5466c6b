"""Arc2Face loading and conditioning on a miniature of the real classes, saved in the hub layout (FACTS 2)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from digi2real.errors import ModelError
from digi2real.generation.arc2face import Arc2Face, apply_shift, id_token_position, load_id_encoder, pad_identity


def _embeddings(n: int, seed: int = 0) -> np.ndarray:
    e = np.random.default_rng(seed).normal(size=(n, 512)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_id_token_position_found_from_the_tokenizer(mini_generator):
    ids, pos = id_token_position(mini_generator.tokenizer)
    tok = mini_generator.tokenizer
    assert pos == 4  # <bos> photo of a id
    assert ids[pos] == tok.convert_tokens_to_ids("id</w>")
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    with pytest.raises(ModelError, match="holds the token"):
        id_token_position(tok, prompt="photo of a person")


def test_id_row_is_the_padded_embedding_before_the_encoder(mini_generator):
    """What the encoder's layers receive at the id position is the zero-padded unit vector, for every batch row."""
    e = _embeddings(3) * 7.0  # not unit: the conditioning must normalise it
    seen = []
    enc = mini_generator.text_encoder
    embeddings = enc.embeddings if hasattr(enc, "embeddings") else enc.text_model.embeddings
    handle = embeddings.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        mini_generator.encode(e)
    finally:
        handle.remove()
    pos = mini_generator.id_position
    # The embeddings layer returns token lookup + position embedding; take the position part away.
    rows = seen[-1][:, pos] - embeddings.position_embedding.weight[pos]
    hidden = mini_generator.hidden_size
    expected = np.zeros((3, hidden), np.float32)
    expected[:, :512] = e / np.linalg.norm(e, axis=1, keepdims=True)
    np.testing.assert_allclose(rows.detach().numpy(), expected, atol=1e-6)
    others = [p for p in range(77) if p != pos]
    plain = embeddings(input_ids=mini_generator._prompt_ids.expand(3, -1))
    assert torch.equal(seen[-1][:, others], plain[:, others])
    assert torch.equal(pad_identity(torch.from_numpy(e), hidden)[:, 512:], torch.zeros(3, hidden - 512))


def test_batch_equals_one_by_one_and_rows_differ(mini_generator):
    e = _embeddings(5, seed=1)
    batch = mini_generator.encode(e)
    assert batch.shape == (5, 77, mini_generator.hidden_size) and batch.dtype == torch.float32
    single = torch.cat([mini_generator.encode(e[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)
    # Every row is conditioned on its own identity (the official helper only handled batch 1).
    for i in range(1, 5):
        assert not torch.allclose(batch[0], batch[i])
    # Tokens before the id position cannot see it (causal mask): identical for all identities.
    torch.testing.assert_close(batch[:, :4], batch[:1, :4].expand(5, -1, -1))


def test_unconditional_branch_is_the_empty_prompt(mini_generator):
    uncond = mini_generator.unconditional()
    assert uncond.shape == (1, 77, mini_generator.hidden_size)
    assert torch.equal(uncond, mini_generator.encode_prompt(""))
    assert mini_generator.unconditional() is uncond  # computed once


def test_shift_weight_zero_is_bit_identical(mini_generator):
    cond = mini_generator.encode(_embeddings(2))
    delta = torch.randn(77, mini_generator.hidden_size)
    assert apply_shift(cond, delta, 0.0) is cond
    assert torch.equal(apply_shift(cond, delta, 1.0), cond + delta)
    with pytest.raises(ValueError, match="another encoder"):
        apply_shift(cond, torch.zeros(77, 8), 1.0)


def test_generate_is_seeded_per_image(mini_generator):
    e = _embeddings(2, seed=3)
    a = mini_generator.generate(e, [11, 12], steps=2, size=64)
    b = mini_generator.generate(e, [11, 12], steps=2, size=64)
    assert a.shape == (2, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    c = mini_generator.generate(e, [11, 13], steps=2, size=64)
    assert np.array_equal(a[0], c[0]) or np.abs(a[0].astype(int) - c[0]).max() <= 2  # same seed, same image
    assert not np.array_equal(a[1], c[1])
    noise = mini_generator.initial_noise([11, 12], 64)
    assert torch.equal(noise[0], mini_generator.initial_noise([11], 64)[0])


def test_legacy_text_model_keys_load_into_the_plain_class(mini_arc2face, mini_generator):
    repo, _ = mini_arc2face
    saved = torch.load(repo / "encoder" / "pytorch_model.bin", weights_only=True)
    assert all(k.startswith("text_model.") for k in saved)
    loaded = mini_generator.text_encoder.state_dict()
    for key, value in saved.items():
        assert torch.equal(loaded[key[len("text_model."):]], value)


def test_encoder_with_foreign_keys_is_refused(mini_arc2face, tmp_path):
    repo, _ = mini_arc2face
    bad = tmp_path / "encoder"
    shutil.copytree(repo / "encoder", bad)
    state = torch.load(bad / "pytorch_model.bin", weights_only=True)
    torch.save({k.replace("text_model.", "model.text."): v for k, v in state.items()}, bad / "pytorch_model.bin")
    with pytest.raises(ModelError, match="do not match"):
        load_id_encoder(bad)


def test_missing_files_in_a_local_directory(mini_arc2face, tmp_path):
    repo, base = mini_arc2face
    copy = tmp_path / "Arc2Face"
    shutil.copytree(repo, copy)
    (copy / "arc2face" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelError) as err:
        Arc2Face.from_pretrained(copy, base, device="cpu")
    msg = str(err.value)
    assert "arc2face/diffusion_pytorch_model.safetensors" in msg and "hf download FoivosPar/Arc2Face" in msg
    assert "\n" not in msg
    with pytest.raises(ModelError, match="not found"):
        Arc2Face.from_pretrained(tmp_path / "nowhere", base, device="cpu")


def _hub_cache(root: Path, repo_id: str, source: Path) -> None:
    """Lay ``source`` out as the hub cache does: models--org--name/snapshots/<commit>/..., refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, folder / "snapshots" / commit)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)


def test_loading_by_hub_id_from_the_cache_offline(mini_arc2face, tmp_path):
    repo, base = mini_arc2face
    cache = tmp_path / "hub"
    _hub_cache(cache, "FoivosPar/Arc2Face", repo)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    code = ("from digi2real.generation.arc2face import Arc2Face\n"
            "m = Arc2Face.from_pretrained('FoivosPar/Arc2Face', %r, device='cpu')\n"
            "print(m.info['revision'], m.id_position)\n") % str(base)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0123456789abcdef0123456789abcdef01234567", "4"]
    # The base repo is not cached: one clear error naming the repo and how to fetch it.
    code = "from digi2real.generation.arc2face import Arc2Face\nArc2Face.from_pretrained('FoivosPar/Arc2Face')\n"
    out = subprocess.run([sys.executable, "-m", "digi2real.cli"] if False else [sys.executable, "-c", code],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in out.stderr and "HF_HUB_OFFLINE" in out.stderr


def test_library_entry_point():
    import digi2real.generation as generation

    assert generation.Arc2Face is Arc2Face and generation.apply_shift is apply_shift
    with pytest.raises(AttributeError):
        generation.nothing_here


def test_dtype_is_a_torch_dtype_or_any_of_its_names(mini_arc2face):
    """diffusers' convention: ``torch.float32`` or "fp32"/"float32"/"auto"...; anything else, and float16 on the CPU,
    is one ConfigError line (issue 11: ``dtype=torch.float16`` raised ``TypeError: attribute name must be string``)."""
    from digi2real.errors import ConfigError
    from digi2real.generation.arc2face import resolve_dtype

    repo, base = mini_arc2face
    model = Arc2Face.from_pretrained(repo, base, device="cpu", dtype=torch.float32)
    assert model.dtype == torch.float32 and next(model.unet.parameters()).dtype == torch.float32
    model = Arc2Face.from_pretrained(repo, base, device="cpu", dtype="bf16")
    assert model.dtype == torch.bfloat16
    assert {p.dtype for p in [*model.unet.parameters(), *model.vae.parameters()]} == {torch.bfloat16}
    assert model.generate(_embeddings(1), [5], steps=1, size=64).shape == (1, 64, 64, 3)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for name, want in [("auto", torch.float32), ("float32", torch.float32), ("fp32", torch.float32),
                       (torch.float32, torch.float32), ("bfloat16", torch.bfloat16), ("BF16", torch.bfloat16),
                       (torch.bfloat16, torch.bfloat16), ("torch.bfloat16", torch.bfloat16)]:
        assert resolve_dtype(name, cpu) == want, name
    for name in ("auto", "float16", "fp16", "half", torch.float16, torch.half):
        assert resolve_dtype(name, cuda) == torch.float16, name
    for name in (torch.float16, "fp16", "half"):
        with pytest.raises(ConfigError, match="float16 needs CUDA; on CPU use float32 or bfloat16"):
            Arc2Face.from_pretrained(repo, base, device="cpu", dtype=name)
    for bad in (torch.int8, torch.float64, "float64", "fp8", 16, None):
        with pytest.raises(ConfigError, match="arc2face.dtype .*use auto, float16 \\(fp16, half\\)") as err:
            Arc2Face.from_pretrained(repo, base, device="cpu", dtype=bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="arc2face.device 'gpu': not a device"):
        Arc2Face.from_pretrained(repo, base, device="gpu")


def test_vae_decodes_in_the_unet_precision(mini_arc2face):
    """Issue 12: the VAE decode runs in the UNet's precision (bfloat16 here; float16 on CUDA by default), the ID
    encoder in float32 whatever the precision."""
    repo, base = mini_arc2face
    model = Arc2Face.from_pretrained(repo, base, device="cpu", dtype="bf16")
    seen: dict[str, torch.dtype] = {}

    def note(name: str):
        def hook(module, inputs, output) -> None:
            seen.setdefault(name, inputs[0].dtype)

        return hook

    hooks = [model.vae.decoder.conv_in.register_forward_hook(note("vae")),
             model.unet.conv_in.register_forward_hook(note("unet"))]
    try:
        model.generate(_embeddings(1), [3], steps=1, size=64)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {"vae": torch.bfloat16, "unet": torch.bfloat16}
    assert {p.dtype for p in model.text_encoder.parameters()} == {torch.float32}
