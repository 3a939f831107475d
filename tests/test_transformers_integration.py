"""packinfer inside Hugging Face transformers' continuous batching: a tiny random Llama served by generate_batch
gives the same greedy tokens with packinfer's attention as with transformers' own paged SDPA, and the tokens
really came through packinfer (its launches are counted, one plan per step served every layer)."""

import pytest

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the optional extra "
                                   "`pip install packinfer-bench[transformers]`)")

import torch
from packinfer.integrations import transformers as pit
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.generation.configuration_utils import ContinuousBatchingConfig

PROMPT_LENGTHS = (5, 17, 9, 30, 2)  # ragged; 63 tokens in all
NEW_TOKENS = 6
LAYERS = 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # initializer_range 0.1 (not the default 0.02) spreads the random logits so that greedy picks are no near-ties
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=256,
                         initializer_range=0.1)
    return LlamaForCausalLM(config).to(torch.float16).eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def generate(model, prompts, implementation: str, max_batch_tokens: int) -> dict[str, list[int]]:
    model.set_attn_implementation(implementation)
    cb = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=max_batch_tokens, use_cuda_graph=False)
    if hasattr(cb, "auto_switch_to_flash"):  # later 5.x releases would swap sdpa for flash where it is installed
        cb.auto_switch_to_flash = False
    greedy = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0)
    out = model.generate_batch(prompts, generation_config=greedy, continuous_batching_config=cb, progress_bar=False)
    assert all(o.error is None for o in out.values()), {k: o.error for k, o in out.items()}
    return {request: o.generated_tokens for request, o in out.items()}


@pytest.mark.parametrize("max_batch_tokens", [64, 16], ids=["whole-prompts", "chunked-prefill"])
def test_generate_batch_matches_paged_sdpa(model, prompts, max_batch_tokens):
    name = pit.register()
    pit.reset_stats()
    ours = generate(model, prompts, name, max_batch_tokens)
    stats = pit.stats()
    theirs = generate(model, prompts, pit.peer_name("sdpa"), max_batch_tokens)

    assert ours == theirs
    assert all(len(tokens) == NEW_TOKENS for tokens in ours.values())
    assert len({tuple(tokens) for tokens in ours.values()}) > 1  # the requests did not collapse to one answer
    # every step's forward pass went through packinfer: one plan per step, reused by each of the layers
    assert stats.plans >= NEW_TOKENS + (max_batch_tokens < sum(PROMPT_LENGTHS))
    assert stats.layers_per_plan == [LAYERS] * stats.plans
    assert stats.launches == LAYERS * stats.plans


def test_plain_forward_is_refused_with_the_reason(model):
    model.set_attn_implementation(pit.register())
    with pytest.raises(ValueError, match="continuous batching"):
        model(torch.tensor([[1, 2, 3]]))


def test_supported_versions_are_checked():
    assert pit.check_version("5.17.0") == "5.17.0"
    assert pit.check_version("5.24.1") == "5.24.1"
    for version in ("4.57.1", "6.0.0", "5.16.1"):
        with pytest.raises(pit.UnsupportedTransformersVersion,
                           match=rf"transformers {version} is installed.*>=5\.17,<6"):
            pit.check_version(version)
