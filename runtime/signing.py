"""Signed model directories: who made this directory, with the OpenSSF ``model-signing`` library.

The sha256s in ``vdeploy.json`` catch corruption (a truncated copy, a flipped bit), but anyone who can
change a file can also change the manifest. A signature says who made the directory: ``vdeploy export
--sign-key KEY.pem`` (or :func:`sign_dir`) signs it with an elliptic-curve private key (P-256, P-384 or
P-521; key-based signing needs no network), and ``vdeploy verify DIR --public-key PUB.pem``,
``Pipeline.from_dir(DIR, public_key=PUB.pem)`` (or :func:`verify_dir`) refuse a directory that is
unsigned, signed with another key, or changed in any way since it was signed.

What is signed: every file in the directory, ``vdeploy.json`` included (so its sha256s and its config are
covered too), with ``model-signing``'s file serialization (sha256 per file), symlinks refused, git files
not exempted. The signature is ``model.sig`` (a Sigstore bundle) inside the directory: it is the one file
the signature does not cover, and ``vdeploy.json`` never lists it in ``files`` (it is written after the
manifest, which it covers). A file added, removed or changed after signing fails verification, even one
the runtime would never open.

``model_signing`` (``pip install 'vdeploy[signing]'``) is imported only here, only when a key is given:
a runtime that verifies no signatures never loads it.
"""

from __future__ import annotations

import ast
import os
import uuid
from pathlib import Path

from .manifest import MANIFEST_NAME, SIGNATURE_NAME, ManifestError

CURVES = ("secp256r1", "secp384r1", "secp521r1")  # what model-signing's EC signer accepts
INSTALL = "pip install 'vdeploy[signing]'"


class SignatureError(ManifestError):
    """A model directory whose signature is missing, from another key, or no longer matches its files
    (also: a key that cannot be used, or model-signing not installed); the message names the problem."""


def _model_signing():
    try:
        from model_signing import hashing, signing, verifying
    except ImportError as e:
        raise SignatureError(f"signing and verifying model directories needs model-signing ({e}): {INSTALL}") from None
    return hashing, signing, verifying


def _hashing_config(hashing):
    # every file but the signature itself; a .gitignore or .git/ in a stranger's directory is signed too
    return hashing.Config().set_ignored_paths(paths=[SIGNATURE_NAME], ignore_git_paths=False)


def _load_key(path: str | Path, private: bool):
    """The EC key in the PEM file ``path``; SignatureError naming the file if it is not one we can use."""
    _model_signing()  # cryptography comes with it
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    what = "private" if private else "public"
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SignatureError(f"cannot read the {what} key {path}: {e.strerror or e}") from None
    try:
        if private:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_pem_public_key(data)
    except TypeError:  # an encrypted private key
        raise SignatureError(f"the private key {path} is encrypted: vdeploy signs with an unencrypted PEM key "
                             "(keep it where only the signer can read it)") from None
    except Exception as e:  # noqa: BLE001 - cryptography raises ValueError and others for bad PEM
        hint = " (a private key? verify with the public one)" if not private and b"PRIVATE KEY" in data else ""
        raise SignatureError(f"{path} is not a PEM {what} key{hint}: {' '.join(str(e).split())[:160]}") from None
    public = key.public_key() if private else key
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name not in CURVES:
        kind = public.curve.name if isinstance(public, ec.EllipticCurvePublicKey) else type(public).__name__
        raise SignatureError(f"the {what} key {path} is {kind}: model signing takes elliptic-curve keys on "
                             f"{', '.join(CURVES)}")
    return key


def check_private_key(path: str | Path) -> None:
    """Refuse, before any slow work, a signing key that cannot sign (SignatureError naming it)."""
    _load_key(path, private=True)


def sign_dir(model_dir: str | Path, private_key: str | Path) -> Path:
    """Sign the model directory ``model_dir`` with ``private_key`` (an unencrypted EC PEM key).

    The signature is written to ``model_dir/model.sig`` atomically (a previous one is replaced).

    Returns:
        The signature's path.

    Raises:
        SignatureError: model-signing missing, an unusable key, a directory that cannot be signed (no
            ``vdeploy.json``, a symlink in it, unreadable files).
    """
    model_dir = Path(model_dir)
    if not (model_dir / MANIFEST_NAME).is_file():
        raise SignatureError(f"{model_dir} has no {MANIFEST_NAME}: sign a directory written by `vdeploy export`")
    check_private_key(private_key)
    hashing, signing, _ = _model_signing()
    target = model_dir / SIGNATURE_NAME
    # not created before the hashing, so the signature never covers its own temporary file
    tmp = model_dir / f".{SIGNATURE_NAME}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        (signing.Config().set_hashing_config(_hashing_config(hashing))
         .use_elliptic_key_signer(private_key=str(private_key)).sign(model_dir, tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except SignatureError:
        raise
    except Exception as e:  # noqa: BLE001 - model-signing's errors are ValueError, OSError and others
        raise SignatureError(f"cannot sign {model_dir}: {' '.join(str(e).split())[:300]}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def verify_dir(model_dir: str | Path, public_key: str | Path) -> None:
    """Check that ``model_dir`` was signed with the private key of ``public_key`` and is unchanged since.

    Reads only ``model.sig`` and hashes the directory's files; nothing in it is parsed or opened as a
    model before this passes.

    Raises:
        SignatureError (a ManifestError): model-signing missing, an unusable public key, no signature, a
            signature from another key or malformed, a file added, removed or changed since signing, a
            symlink in the directory.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SignatureError(f"model directory {model_dir} does not exist")
    _load_key(public_key, private=False)
    signature = model_dir / SIGNATURE_NAME
    if not signature.is_file() or signature.is_symlink():
        raise SignatureError(f"{model_dir} is not signed (no {SIGNATURE_NAME}): it cannot be checked against "
                             f"{public_key}; sign it with `vdeploy export --sign-key KEY.pem`")
    hashing, _, verifying = _model_signing()
    config = (verifying.Config().set_hashing_config(_hashing_config(hashing))
              .use_elliptic_key_verifier(public_key=str(public_key)))
    try:
        config.verify(model_dir, signature)
    except Exception as e:  # noqa: BLE001 - a hostile model.sig raises JSON, key, protobuf and value errors
        raise SignatureError(_explain(model_dir, public_key, e)) from None


def _explain(model_dir: Path, public_key, error: Exception) -> str:
    """One line for a failed verification, naming files rather than quoting digests."""
    text = " ".join(str(error).split())
    if text.startswith("Key mismatch"):
        return (f"{model_dir / SIGNATURE_NAME} was not made with the key of {public_key}: signed by someone "
                "else (or re-signed)")
    if text.startswith("Signature mismatch: "):
        return f"{model_dir} was modified after it was signed ({_mismatch(str(error)) or text[:200]})"
    if "symlink" in text:
        return f"{model_dir} holds a symlink, which a signed directory may not: {text[:200]}"
    return f"{model_dir / SIGNATURE_NAME} is not a valid signature ({type(error).__name__}: {text[:200]})"


def _mismatch(message: str) -> str:
    """``changed: a, b; added: c; removed: d`` from model-signing's "Signature mismatch: [...]" (the repr of
    its list of differences), or "" where it has another form."""
    try:
        items = ast.literal_eval(message.split(": ", 1)[1])
    except (ValueError, SyntaxError, IndexError):
        return ""
    changed, parts = [], []
    for item in items if isinstance(items, list) else []:
        item = str(item)
        if item.startswith("Hash mismatch for '"):
            changed.append(item[len("Hash mismatch for '"):].split("': Expected", 1)[0])
        for prefix, label in (("Extra files found in model ", "added"), ("Missing files in model ", "removed")):
            if item.startswith(prefix) and "': " in item:
                parts.append(f"{label}: {item.split(chr(39) + ': ', 1)[1]}")
    return "; ".join(([f"changed: {', '.join(changed)}"] if changed else []) + parts)
