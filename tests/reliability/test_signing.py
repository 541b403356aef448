"""Signed model directories (OpenSSF model-signing, EC keys, offline): sign, verify, and every way a
directory can fail verification — unsigned, signed by another key, modified (even with its sha256s
updated), a file added or removed, a symlink, a malformed signature — through the API, `Pipeline.from_dir`
and the CLI (`vdeploy verify`, `vdeploy export --sign-key`)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from runtime_fixtures import model_dir

from vdeploy.cli import main
from vdeploy.runtime import Pipeline
from vdeploy.runtime import manifest as manifest_lib
from vdeploy.runtime.manifest import SIGNATURE_NAME, ManifestError

signing = pytest.importorskip("vdeploy.runtime.signing")
pytest.importorskip("model_signing")


def _write_key(folder, name, curve=None):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(curve or ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return {"alice": _write_key(folder, "alice"), "mallory": _write_key(folder, "mallory")}


@pytest.fixture
def signed(keys):
    folder = model_dir("uncond")
    signature = signing.sign_dir(folder, keys["alice"][0])
    assert signature == folder / SIGNATURE_NAME and signature.stat().st_size > 0
    return folder


def rehash(folder):
    """Update vdeploy.json's sha256s to the files as they are now: what a careful attacker does."""
    data = json.loads((folder / "vdeploy.json").read_text())
    data["files"] = {name: manifest_lib.sha256_file(folder / name) for name in data["files"]}
    (folder / "vdeploy.json").write_text(json.dumps(data))


def refused_before_opening(monkeypatch, folder, public_key, match):
    """Pipeline.from_dir refuses with ManifestError matching ``match`` and never reads vdeploy.json."""
    def must_not_run(*args, **kwargs):
        raise AssertionError("the manifest was read before the signature was checked")

    monkeypatch.setattr(manifest_lib, "load", must_not_run)
    with pytest.raises(ManifestError, match=match) as info:
        Pipeline.from_dir(folder, backend="cpu", public_key=public_key)
    monkeypatch.undo()
    assert isinstance(info.value, signing.SignatureError)
    return str(info.value)


def test_a_signed_directory_verifies_and_samples(signed, keys):
    signing.verify_dir(signed, keys["alice"][1])
    pipe = Pipeline.from_dir(signed, backend="cpu", public_key=keys["alice"][1])
    video = pipe(steps=2, seed=0, sampler="ddim")
    assert video.shape == (1, *pipe.shape) and np.isfinite(video).all()
    # the manifest never lists the signature, and re-signing replaces it
    assert SIGNATURE_NAME not in manifest_lib.load(signed).files
    signing.sign_dir(signed, keys["alice"][0])
    assert sorted(p.name for p in signed.iterdir() if p.name.startswith(".")) == []
    signing.verify_dir(signed, keys["alice"][1])


def test_renamed_directory_still_verifies(signed, keys, tmp_path):
    moved = tmp_path / "renamed-copy"
    shutil.copytree(signed, moved)
    signing.verify_dir(moved, keys["alice"][1])


def test_unsigned_is_refused_before_anything_is_opened(monkeypatch, keys):
    folder = model_dir("uncond")
    message = refused_before_opening(monkeypatch, folder, keys["alice"][1], "is not signed")
    assert SIGNATURE_NAME in message


def test_signed_by_another_key_is_refused(monkeypatch, signed, keys):
    signing.sign_dir(signed, keys["mallory"][0])  # re-signed by someone else
    refused_before_opening(monkeypatch, signed, keys["alice"][1], "was not made with the key of")


@pytest.mark.parametrize("change,named", [
    ("modify", r"changed: denoiser.onnx, vdeploy.json"),
    ("add", r"added: extra.onnx"),
    ("remove", r"removed: denoiser.onnx"),
    ("manifest", r"changed: vdeploy.json"),
])
def test_modified_after_signing_is_refused(monkeypatch, signed, keys, change, named):
    if change == "modify":  # the sha256 check alone would pass: the manifest was updated to match
        with open(signed / "denoiser.onnx", "ab") as f:
            f.write(b"\0")
        rehash(signed)
        manifest_lib.load(signed)
    elif change == "add":
        (signed / "extra.onnx").write_bytes(b"unlisted")
    elif change == "remove":
        (signed / "denoiser.onnx").unlink()
    else:
        data = json.loads((signed / "vdeploy.json").read_text())
        data["parity"] = {"note": "edited"}
        (signed / "vdeploy.json").write_text(json.dumps(data))
    message = refused_before_opening(monkeypatch, signed, keys["alice"][1], "was modified after it was signed")
    assert __import__("re").search(named, message), message
    assert "Digest(" not in message and "\n" not in message


def test_a_symlink_in_a_signed_directory_is_refused(monkeypatch, signed, keys, tmp_path):
    (tmp_path / "elsewhere").write_bytes(b"x")
    os.symlink(tmp_path / "elsewhere", signed / "link")
    refused_before_opening(monkeypatch, signed, keys["alice"][1], "symlink")


@pytest.mark.parametrize("content", [b"", b"junk", b"{}", b'{"mediaType": 1}', b"[]", None])
def test_a_malformed_signature_is_refused(monkeypatch, signed, keys, content):
    sig = signed / SIGNATURE_NAME
    data = sig.read_bytes()
    if content is None:  # a valid bundle cut short
        content = data[: len(data) // 2]
    sig.write_bytes(content)
    refused_before_opening(monkeypatch, signed, keys["alice"][1], "not a valid signature")


def test_unusable_keys_are_named(signed, keys, tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec

    with pytest.raises(signing.SignatureError, match="a private key. verify with the public one"):
        signing.verify_dir(signed, keys["alice"][0])
    with pytest.raises(signing.SignatureError, match="cannot read the public key"):
        signing.verify_dir(signed, tmp_path / "missing.pub")
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(signing.SignatureError, match="is not a PEM public key"):
        signing.verify_dir(signed, tmp_path / "junk.pub")
    k1_private, k1_public = _write_key(tmp_path, "k1", ec.SECP256K1())
    with pytest.raises(signing.SignatureError, match="secp256k1: model signing takes"):
        signing.verify_dir(signed, k1_public)
    with pytest.raises(signing.SignatureError, match="secp256k1"):
        signing.sign_dir(signed, k1_private)
    signing.verify_dir(signed, keys["alice"][1])  # refusing to sign left the signature as it was


# ----------------------------------------------------------------------------------------------- CLI --


def one_line_exit_2(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_cli_verify(signed, keys):
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(signed), "--public-key", str(keys["alice"][1])])
    assert ok.exit_code == 0, ok.output
    assert "unchanged since" in ok.output and "files match vdeploy.json" in ok.output
    one_line_exit_2(runner.invoke(main, ["verify", str(signed), "--public-key", str(keys["mallory"][1])]),
                    "was not made with the key of")
    one_line_exit_2(runner.invoke(main, ["verify", str(signed), "--public-key", str(keys["alice"][0])]),
                    "not a PEM public key")
    (signed / "extra").write_bytes(b"x")
    one_line_exit_2(runner.invoke(main, ["verify", str(signed), "--public-key", str(keys["alice"][1])]),
                    "modified after it was signed", "added: extra")
    unsigned = model_dir("uncond")
    one_line_exit_2(runner.invoke(main, ["verify", str(unsigned), "--public-key", str(keys["alice"][1])]),
                    "is not signed")
    one_line_exit_2(runner.invoke(main, ["verify", str(unsigned / "nope"), "--public-key", str(keys["alice"][1])]),
                    "does not exist")


def test_cli_sample_with_a_public_key(signed, keys, tmp_path):
    runner = CliRunner()
    args = ["sample", "--model", str(signed), "--out", str(tmp_path / "s.gif"), "--steps", "2", "--backend", "cpu",
            "--quiet", "--public-key"]
    ok = runner.invoke(main, [*args, str(keys["alice"][1])])
    assert ok.exit_code == 0 and (tmp_path / "s.gif").is_file(), ok.output
    one_line_exit_2(runner.invoke(main, [*args, str(keys["mallory"][1])]), "was not made with the key of")
    unsigned = model_dir("uncond")
    result = runner.invoke(main, ["sample", "--model", str(unsigned), "--out", str(tmp_path / "u.gif"), "--quiet",
                                  "--public-key", str(keys["alice"][1])])
    one_line_exit_2(result, "is not signed")
    assert not (tmp_path / "u.gif").exists()


def test_cli_verify_checks_the_manifest_too(keys):
    """A directory signed in a broken state (its sha256s wrong) is still refused: signed is not valid."""
    folder = model_dir("uncond")
    with open(folder / "denoiser.onnx", "ab") as f:
        f.write(b"\0")
    signing.sign_dir(folder, keys["alice"][0])
    one_line_exit_2(CliRunner().invoke(main, ["verify", str(folder), "--public-key", str(keys["alice"][1])]),
                    "does not match the sha256")


def test_export_refuses_an_unusable_sign_key_before_exporting(tmp_path, keys):
    (tmp_path / "bad.pem").write_text("not a key")
    out = tmp_path / "model"
    for key, fragment in ((tmp_path / "bad.pem", "is not a PEM private key"),
                          (keys["alice"][1], "is not a PEM private key"),
                          (tmp_path / "missing.pem", "cannot read the private key")):
        result = CliRunner().invoke(main, ["export", "--ckpt", str(tmp_path / "no-such.pt"), "--out", str(out),
                                           "--sign-key", str(key)])
        one_line_exit_2(result, "--sign-key", fragment)
        assert not out.exists()


def test_export_sign_key_signs_what_it_wrote(tmp_path, keys, monkeypatch, request):
    """`vdeploy export --sign-key`: the directory it wrote verifies with the public key. In CI the export
    itself is replaced by a copy of a tiny model directory (the CLI's check-key, export, sign sequence is what
    is tested); --reliability-full exports a tiny checkpoint for real."""
    out = tmp_path / "model"
    if request.config.getoption("--reliability-full"):
        from export_fixtures import TINY_UNCOND_CONFIG, single_thread_torch, tiny_unet, write_vdeploy_checkpoint

        single_thread_torch()
        unet, config = tiny_unet(TINY_UNCOND_CONFIG)
        ckpt = write_vdeploy_checkpoint(tmp_path / "model-7.pt", unet, config)
    else:
        import vdeploy.export

        def fake_export(ckpt, out, **kwargs):
            shutil.copytree(model_dir("uncond"), out)
            return manifest_lib.load(out)

        monkeypatch.setattr(vdeploy.export, "export_onnx", fake_export)
        ckpt = tmp_path / "model-7.pt"
    result = CliRunner().invoke(main, ["export", "--ckpt", str(ckpt), "--out", str(out), "--optimize", "none",
                                       "--sign-key", str(keys["alice"][0])])
    assert result.exit_code == 0, result.output
    assert f"signed {out}" in result.output
    assert (out / SIGNATURE_NAME).is_file() and SIGNATURE_NAME not in manifest_lib.load(out).files
    signing.verify_dir(out, keys["alice"][1])
    with pytest.raises(signing.SignatureError, match="was not made with the key"):
        signing.verify_dir(out, keys["mallory"][1])
