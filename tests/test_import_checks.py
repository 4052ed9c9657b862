"""Importers refuse what nanomeg does not compute; builders draw only the new heads fresh.

1. every field of each transformers config class an importer reads is sorted: read as a size, checked
   against what nanomeg computes (nanomeg.HF_KEYS), or one that changes nothing computed;
2. the checked keys that nanomeg can compute give transformers' logits (Mixtral at top-1, GPT-2
   without the 1/sqrt(d) scale, GPT-2 with reorder_and_upcast_attn);
3. the others are one ValueError naming the key and its value, also through train.py --init-hf;
4. bert_for_task and biencoder_from_bert refuse an encoder that is not the config's.
"""

import inspect
import json
import re

import pytest
import torch
from common import SERIAL, rand, randint
from test_gpt import real_logits

import nanomeg as N
import train

transformers = pytest.importorskip("transformers", reason="the importers are checked against transformers")

# ---------------------------------------------------------------------------------------------------
# 1. Every field sorted
# ---------------------------------------------------------------------------------------------------

# Fields of every transformers config (PreTrainedConfig): none changes the math; architectures, model_type
# and is_encoder_decoder are checked where HF_KEYS lists them.
GENERIC = {"transformers_version", "architectures", "model_type", "_name_or_path", "output_hidden_states",
           "output_attentions", "return_dict", "dtype", "id2label", "label2id", "problem_type",
           "chunk_size_feed_forward",  # feed-forward in chunks of the sequence: the same numbers
           "is_encoder_decoder"}
IDS = {"pad_token_id", "bos_token_id", "eos_token_id", "use_cache", "initializer_range"}  # BERT: pad is not a position
# Dropout rates are the caller's (the importers set none; train.py takes --dropout).
BERT_READ = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "type_vocab_size", "layer_norm_eps"}
BERT_NO_EFFECT = IDS | {"hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"}  # the caller's
LLAMA_READ = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
              "rope_parameters", "head_dim"}
# what -> (config classes, fields read as sizes, fields that change nothing computed)
SORTED = {
    "GPT-2": ([transformers.GPT2Config],
              {"vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "layer_norm_epsilon"},
              IDS | {"resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_type", "summary_use_proj",
                     "summary_activation", "summary_proj_to_labels", "summary_first_dropout"}),  # DoubleHeads' head
    "Llama / Mixtral": ([transformers.LlamaConfig, transformers.MixtralConfig],
                        LLAMA_READ | {"num_local_experts", "num_experts_per_tok", "router_aux_loss_coef"},
                        IDS | {"attention_dropout", "pretraining_tp",  # pretraining_tp: the same matmuls, cut
                               "output_router_logits"}),  # adds the aux loss to HF's loss; logits unchanged
    "BERT": ([transformers.BertConfig, transformers.MegatronBertConfig], BERT_READ, BERT_NO_EFFECT),
    "DPR": ([transformers.DPRConfig], BERT_READ | {"projection_dim"}, BERT_NO_EFFECT),
    "T5": ([transformers.T5Config],
           {"vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
            "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
            "tie_word_embeddings", "scale_decoder_outputs"},
           IDS | {"dropout_rate", "classifier_dropout", "initializer_factor",
                  "dense_act_fn", "is_gated_act"}),  # both derived from feed_forward_proj
}


def config_fields(cls) -> set:
    """The fields of a transformers config class: its __init__'s arguments and a default instance's to_dict()."""
    named = {n for n, p in inspect.signature(cls.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY
             or (p.kind is p.POSITIONAL_OR_KEYWORD and n != "self")}
    return named | set(cls().to_dict())


@pytest.mark.parametrize("what", SORTED)
def test_every_field_of_each_config_class_is_read_checked_or_without_effect(what):
    """A field transformers adds (or a class this list misses) fails here until someone decides whether it
    changes the math; and each class's defaults are what nanomeg computes (an absent key is the default)."""
    classes, read, no_effect = SORTED[what]
    checked = {k.split(".")[0] for k in N.HF_KEYS[what]}
    for cls in classes:
        unsorted = config_fields(cls) - checked - read - no_effect - GENERIC
        assert not unsorted, f"{cls.__name__}: {sorted(unsorted)} neither read, checked nor listed as without effect"
        N.check_hf_config(cls().to_dict(), what)


# ---------------------------------------------------------------------------------------------------
# 2. What nanomeg computes: transformers' logits
# ---------------------------------------------------------------------------------------------------


def jitter(model):
    """model, eval mode, its weights moved off the init (no tensor trivially ones or zeros)."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_((0.3 if p.dim() > 1 else 0.1) * rand(i, *p.shape).float())
    return model.eval()


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_mixtral_top1_renormalises_its_gate_as_transformers_does():
    """MixtralTopKRouter divides the top-k probabilities by their sum at every k: at k = 1 the chosen expert's
    gate is 1. nanomeg's Switch rule (the raw probability) was ~1.3 off; the import now sets moe_renormalize."""
    config = transformers.MixtralConfig(vocab_size=37, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                        num_local_experts=4, num_experts_per_tok=1, bos_token_id=0, eos_token_id=None,
                                        pad_token_id=0)
    torch.manual_seed(0)
    model = jitter(transformers.MixtralForCausalLM(config))
    cfg = N.llama_config_from_hf(config, vocab_multiple=8)
    assert (cfg.moe_topk, cfg.renormalizes_gates) == (1, True)
    ids = randint(1, 37, 2, 9)
    got = real_logits(N.from_hf_llama(model.state_dict(), cfg), ids, cfg, SERIAL)
    torch.testing.assert_close(got, logits_of(model, ids), rtol=1e-5, atol=1e-5)
    switch = N.GPTConfig(**{**cfg.__dict__, "moe_renormalize": None})  # Switch's raw gate: HF cannot hold it
    with pytest.raises(ValueError, match=re.escape("{'renormalizes_gates': False}")):
        N.llama_hf_config(switch)


@pytest.mark.parametrize("change", [dict(scale_attn_weights=False), dict(reorder_and_upcast_attn=True),
                                    dict(n_inner=40)])
def test_gpt2_switches_nanomeg_computes_give_transformers_logits(change):
    """scale_attn_weights=False was ignored (logits scaled by 1/sqrt(d) all the same): it is now nanomeg's
    scale_attention. reorder_and_upcast_attn only computes the softmax in fp32: the same numbers. n_inner
    (refused unless 4 x n_embd) is nanomeg's ffn."""
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **change)
    torch.manual_seed(0)
    model = jitter(transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager"))
    cfg = N.gpt2_config_from_hf(config.to_dict(), vocab_multiple=8)
    ids = randint(2, 50, 2, 11)
    got = real_logits(N.from_hf_gpt2(model.state_dict(), cfg), ids, cfg, SERIAL)
    torch.testing.assert_close(got, logits_of(model, ids), rtol=1e-5, atol=1e-5)
    assert N.gpt2_config_from_hf(N.gpt2_hf_config(cfg), vocab_multiple=8) == cfg


# ---------------------------------------------------------------------------------------------------
# 3. What nanomeg does not compute: refused, naming the key and its value
# ---------------------------------------------------------------------------------------------------

GPT2 = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10, n_positions=8, bos_token_id=0,
                                eos_token_id=0).to_dict()
LLAMA = transformers.LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=10).to_dict()
OLD_LLAMA = {k: v for k, v in LLAMA.items() if k != "rope_parameters"} | dict(rope_theta=10000.0)  # transformers 4
MIXTRAL = transformers.MixtralConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, vocab_size=10, num_local_experts=2).to_dict()
BERT = transformers.BertConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                               vocab_size=10).to_dict()
T5 = transformers.T5Config(d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2, vocab_size=10).to_dict()
DPR = transformers.DPRConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                             vocab_size=10).to_dict()


@pytest.mark.parametrize("importer, hf, message", [
    (N.gpt2_config_from_hf, GPT2 | dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
    (N.gpt2_config_from_hf, GPT2 | dict(add_cross_attention=True), "add_cross_attention=True"),
    (N.gpt2_config_from_hf, GPT2 | dict(tie_word_embeddings=False), "tie_word_embeddings=False"),
    (N.gpt2_config_from_hf, GPT2 | dict(activation_function="relu"), "activation_function='relu'"),
    (N.gpt2_config_from_hf, GPT2 | dict(architectures=["GPT2ForTokenClassification"]),
     "architectures='GPT2ForTokenClassification'"),
    (N.gpt2_config_from_hf, GPT2 | dict(model_type="gpt_neo"), "model_type='gpt_neo'"),
    (N.gpt2_config_from_hf, GPT2 | dict(architectures=5), "architectures=5"),
    (N.llama_config_from_hf, OLD_LLAMA | dict(rope_scaling={"type": "linear", "factor": 4.0}),
     "rope_scaling.type='linear'"),
    (N.llama_config_from_hf, OLD_LLAMA | dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     "rope_scaling.rope_type='yarn'"),
    (N.llama_config_from_hf, LLAMA | dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}),
     "rope_parameters.rope_type='llama3'"),
    (N.llama_config_from_hf, LLAMA | dict(mlp_bias=True), "mlp_bias=True"),
    (N.llama_config_from_hf, LLAMA | dict(model_type="mistral"), "model_type='mistral'"),
    (N.llama_config_from_hf, MIXTRAL | dict(sliding_window=4), "sliding_window=4"),
    (N.llama_config_from_hf, MIXTRAL | dict(router_jitter_noise=0.1), "router_jitter_noise=0.1"),
    (N.bert_config_from_hf, BERT | dict(model_type="roberta"), "model_type='roberta'"),
    (N.bert_config_from_hf, BERT | dict(position_embedding_type="relative_key"),
     "position_embedding_type='relative_key'"),
    (N.bert_config_from_hf, BERT | dict(is_decoder=True), "is_decoder=True"),
    (N.bert_config_from_hf, BERT | dict(tie_word_embeddings=False), "tie_word_embeddings=False"),
    (N.bert_config_from_hf, BERT | dict(problem_type="regression"), "problem_type='regression'"),
    (N.bert_config_from_hf, BERT | dict(architectures=["BertForTokenClassification"]),
     "architectures='BertForTokenClassification'"),
    (N.bert_config_from_hf, DPR, "model_type='dpr'"),
    (N.dpr_config_from_hf, DPR | dict(architectures=["DPRReader"]), "architectures='DPRReader'"),
    (N.dpr_config_from_hf, BERT, "model_type='bert'"),
    (N.t5_config_from_hf, T5 | dict(model_type="umt5"), "model_type='umt5'"),
    (N.t5_config_from_hf, T5 | dict(model_type="mt5"), "model_type='mt5'"),
    (N.t5_config_from_hf, T5 | dict(is_decoder=True), "is_decoder=True"),
    (N.t5_config_from_hf, {k: v for k, v in T5.items() if k != "model_type"}, "has no model_type"),
])
def test_a_config_nanomeg_does_not_compute_is_refused_naming_the_key(importer, hf, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        importer(hf, vocab_multiple=2)
    assert "\n" not in str(e.value)


def test_transformers_own_umt5_and_roberta_configs_are_refused():
    """The two the issue names, as transformers builds them: UMT5 has a relative-position table in every
    layer, RoBERTa offsets its positions by the padding id."""
    with pytest.raises(ValueError, match=re.escape("model_type='umt5': nanomeg's T5 import computes only 't5'")):
        N.t5_config_from_hf(transformers.UMT5Config(num_layers=1))
    with pytest.raises(ValueError, match=re.escape("model_type='roberta'")):
        N.bert_config_from_hf(transformers.RobertaConfig(num_hidden_layers=1))


def test_init_hf_refuses_a_gpt2_config_nanomeg_does_not_compute(tmp_path, capsys):
    """--init-hf reads config.json through the same check: one error line, exit 2, before any weight is read."""
    data = tmp_path / "abc.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    (tmp_path / "gpt2").mkdir()
    hf = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=64,
                                 scale_attn_by_inverse_layer_idx=True).to_dict()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(hf))
    code = train.main(["--data", str(data), "--seq", "32", "--batch", "2", "--steps", "1",
                       "--init-hf", str(tmp_path / "gpt2")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == "error: HF config scale_attn_by_inverse_layer_idx=True: nanomeg's GPT-2 import computes only " \
                  "False\n", err


# ---------------------------------------------------------------------------------------------------
# 4. Builders: only the new head is drawn fresh
# ---------------------------------------------------------------------------------------------------

SIZES = dict(vocab_size=10, vocab_multiple=2, max_seq=8, hidden=8, heads=2)


@pytest.mark.parametrize("layers, message", [(1, "missing ['layers.1."), (3, "unexpected ['layers.2.")])
def test_bert_for_task_refuses_an_encoder_of_another_depth(layers, message):
    """A pretrained encoder of 1 (or 3) layers for a 2-layer classifier: layer 1 was drawn fresh (layer 2
    dropped) without a word."""
    pretrained = N.init_bert(N.BertConfig(**SIZES, layers=layers), 0)
    with pytest.raises(ValueError, match=re.escape(message)):
        N.bert_for_task(pretrained, N.BertConfig(**SIZES, layers=2, task="classify", num_classes=3))
    full = N.bert_for_task(N.init_bert(N.BertConfig(**SIZES, layers=2), 0), N.BertConfig(**SIZES, layers=2,
                                                                                         task="classify"))
    assert "classifier.weight" in full and "lm_head.bias" not in full  # the head fresh, the unused ones dropped


def test_biencoder_from_bert_refuses_a_bert_of_another_norm_order():
    """A pre-norm BERT (final_norm, no embed.norm) into post-norm towers: embed.norm was drawn fresh and
    final_norm dropped without a word."""
    bert = N.init_bert(N.BertConfig(**SIZES, layers=1, norm_order="pre"), 0)
    with pytest.raises(ValueError, match=re.escape("missing ['embed.norm.bias', 'embed.norm.weight']")):
        N.biencoder_from_bert(bert, N.BiEncoderConfig(**SIZES, layers=1, projection_dim=4))
    towers = N.biencoder_from_bert(bert, N.BiEncoderConfig(**SIZES, layers=1, norm_order="pre", projection_dim=4))
    assert torch.equal(towers["final_norm.weight"], bert["final_norm.weight"]) and "projection.weight" in towers
