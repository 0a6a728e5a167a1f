"""Shared fixtures: a tiny byte-level BPE tokenizer with a chat template and a tiny
random Llama (2 layers, hidden 32) built from config — no hub, no files from packages."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    """Set Prefect's logging up once, bound to the session's stderr. Otherwise the first
    test to trigger it decides: a CliRunner invocation binds Prefect's console handler
    to CliRunner's temporary stream, and every later flow logs into a closed file."""
    from prefect.logging.configuration import setup_logging

    setup_logging()

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "Add 2 and 3. The answer is 5. Question: answer: yes no true false.",
    "The quick brown fox jumps over the lazy dog 0123456789 + - * / = ?!.,:;'\"()",
    "Summarise the text. Translate the sentence. Choose the best option among A B C D.",
]


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab ≈ 400) with SmolLM2-style special tokens and
    chat template; pad = eos = <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A random LlamaForCausalLM (float32, tied embeddings) for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    return build_tiny_llama(len(tiny_tokenizer))


@pytest.fixture()
def tiny_model_dir(tmp_path, tiny_tokenizer, tiny_model):
    """A saved HF directory (safetensors + config + tokenizer) of the tiny model."""
    out = tmp_path / "tiny-base"
    tiny_model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3 endpoint: moto in server mode on a free 127.0.0.1 port (boto3 talks
    HTTP to it unchanged). Stopped when the module's tests are done."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
