"""Data, weights and tokenizers are read as data: nothing in the package can run code from them.
(Config files are Python and trusted by design.)"""

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "plug_jax"
# Each deserializes code, or lets a model repository run its own.
FORBIDDEN = re.compile(r"\bimport pickle\b|\bpickle\.|\bcloudpickle\b|\bdill\b|\bjoblib\b"
                       r"|torch\.load\b|allow_pickle\s*=\s*True|trust_remote_code|(?<![.\w])eval\(")


def _sources():
    sources = {path: path.read_text() for path in PACKAGE.rglob("*.py")}
    assert len(sources) > 30
    return sources


def test_no_code_execution_from_data():
    found = [f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
             for path, text in _sources().items()
             for number, line in enumerate(text.splitlines(), 1) if FORBIDDEN.search(line)]
    assert not found, "\n".join(found)


def test_every_np_load_refuses_pickles():
    calls = [(path, match) for path, text in _sources().items()
             for match in re.finditer(r"(?<![\w.])(?:np|numpy)\.load\((?:[^()]|\([^()]*\))*\)", text)]
    assert all("allow_pickle=False" in match[0] for _, match in calls), calls


def test_the_checker_catches_what_it_forbids():
    for line in ("import pickle", "state = torch.load(path)", "np.load(f, allow_pickle=True)",
                 "AutoModel.from_pretrained(p, trust_remote_code=True)"):
        assert FORBIDDEN.search(line), line
