"""CodeGen's tokenizer against published ids, its whitespace tokens, round trips on real text, and
the tiktoken fast path against the `tokenizers` reference."""

import pytest
from transformers import AutoTokenizer

from molm_megatron.data.corpus import stdlib_sources
from tokenizer import CODEGEN, EOS_ID, VOCAB_SIZE, load_tokenizer
from tokenizer.__main__ import main as tokenizer_cli

# Ids published outside this project. GPT-2: "Hello world" and " the" are the ids every GPT-2 BPE
# tutorial shows. The rest: dotnet/machinelearning, test/Microsoft.ML.Tokenizers.Tests/CodeGenTests.cs,
# generated from Salesforce/codegen-350M-mono's vocab.json / merges.txt ("  Hello World" is its
# prefix-space case: the leading two spaces are CodeGen's token 50286).
KNOWN_IDS = {
    "Hello world": [15496, 995],
    " the": [262],
    "Hello World": [15496, 2159],
    "  Hello World": [50286, 15496, 2159],
    "The quick brown fox jumps over the lazy dog.": [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13],
    "the brown fox jumped over the lazy dog!\r\n": [1169, 7586, 21831, 11687, 625, 262, 16931, 3290, 0, 201, 198],
    "Some Greek letters ΣΦΩ αβγδε.": [4366, 8312, 7475, 7377, 96, 138, 99, 138, 102, 26367, 26638, 42063, 138, 112, 30950, 13],
    "Surrogates: 😀😂😍😘": [14214, 3828, 689, 25, 30325, 222, 47249, 224, 47249, 235, 47249, 246],
}

TRICKY = [
    "", " ", "  ", "\t", "x  ", "a" + " " * 32 + "b", " " * 70, "\t" * 11 + "y", " \t \t  \t\t\n\n\r\n ",
    "don't you'll we've I'M", "naïve café 北京 русский 🙂 \u200b", "a<|endoftext|>b", "1234567890 3.14159",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # Built through the command line, as users do.
    out = tmp_path_factory.mktemp("tok") / "codegen"
    assert tokenizer_cli(["build-codegen", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def backends(folder):
    return {"tiktoken": load_tokenizer(folder), "tokenizers": load_tokenizer(folder, backend="tokenizers")}


def test_fast_path_is_chosen_for_codegen(backends):
    assert backends["tiktoken"].description.endswith("(tiktoken)")
    assert backends["tokenizers"].description.endswith("(tokenizers)")
    assert load_tokenizer(CODEGEN).description.endswith("(tiktoken)")


@pytest.mark.parametrize("name", ["tiktoken", "tokenizers"])
def test_published_ids(backends, name):
    tok = backends[name]
    assert (tok.vocab_size, tok.eod_id) == (VOCAB_SIZE, EOS_ID) == (50295, 50256)
    for text, ids in KNOWN_IDS.items():
        assert tok.encode(text) == ids, text


@pytest.mark.parametrize("name", ["tiktoken", "tokenizers"])
def test_every_whitespace_token(backends, name):
    tok = backends[name]
    for n in range(2, 32):  # CodeGen: ids 50257.. are 31, 30, ..., 2 spaces
        assert tok.encode(" " * n) == [50257 + 31 - n], n
        assert tok.decode([50257 + 31 - n]) == " " * n
    for n in range(2, 10):  # then 9, 8, ..., 2 tabs
        assert tok.encode("\t" * n) == [50287 + 9 - n], n
        assert tok.decode([50287 + 9 - n]) == "\t" * n
    # Longest first, the leftover single space goes to GPT-2's BPE (220 is GPT-2's " ").
    assert tok.encode(" " * 33) == [50257, 50286]
    assert tok.encode(" " * 32) == [50257, 220]
    assert tok.encode("    x") == [50284, 87]


def test_document_text_cannot_forge_end_of_document(backends):
    for tok in backends.values():
        ids = tok.encode("a<|endoftext|>b")
        assert EOS_ID not in ids and tok.decode(ids) == "a<|endoftext|>b"


def test_round_trip_and_backends_agree_on_stdlib(backends):
    texts = [p.read_text(encoding="utf-8") for p in stdlib_sources(1_500_000)] + TRICKY
    fast, ref = backends["tiktoken"], backends["tokenizers"]
    for text in texts:
        ids = fast.encode(text)
        assert ids == ref.encode(text)
        assert fast.decode(ids) == text


def test_folder_loads_in_transformers(folder, backends):
    hf = AutoTokenizer.from_pretrained(folder)
    assert len(hf) == VOCAB_SIZE
    assert hf.bos_token_id == hf.eos_token_id == EOS_ID
    for text in list(KNOWN_IDS) + TRICKY[:-3]:
        ids = hf(text)["input_ids"]
        assert ids == backends["tokenizers"].encode(text)
        assert hf.decode(ids) == text
