"""The chat templates of today's families through our renderer (templates written here to behave like each family's,
on tokenizers built here): Qwen3 writes an empty `<think></think>` before an answer that has no reasoning, and
Qwen3.5 opens `<think>` in its generation prompt; under tokenizer.thinking: context (the default) the empty block
is context, never trained as an answer, and the generation prompt ends with it as training saw it (Qwen's
enable_thinking=false); under `train` it is trained. Gemma's template has no system role and refuses roles that do
not alternate: the render stage makes that a bad row with the template's own message. gpt-oss writes each answer in
its channels: the channel headers are trained, the end of a served answer is <|return|>, history ends with <|end|>."""
import json
import random

import numpy as np
import pytest
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.common import UserError
from pipeline.config import TokenizerConfig
from pipeline.evaluate import dev_prompts
from pipeline.pack import pack
from pipeline.render import render_split
from pipeline.template import render, render_prompt, text_tokenizer
from pipeline.tokenizer import make_tokenizer
from tests.conftest import config
from tests.test_model_template import GEMMA, WORDS
from tests.test_model_template import QWEN3 as QWEN3_TEMPLATE

# Qwen3's: the last answer after the last user turn opens with its reasoning, an empty block when none; the
# generation prompt writes an empty block when thinking is switched off
QWEN3 = QWEN3_TEMPLATE.replace(
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")
QWEN35 = QWEN3.replace(  # Qwen3.5's: thinking by default, the generation prompt opens the block
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}",
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}")
GPT_OSS = (  # gpt-oss's harmony format, reduced to its channels: reasoning in `analysis`, the answer in `final`
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- if loop.last and message.thinking is defined %}"
    "{{- '<|start|>assistant<|channel|>analysis<|message|>' + message.thinking + '<|end|>' }}{%- endif %}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + message.content }}"
    "{{- '<|return|>' if loop.last else '<|end|>' }}"
    "{%- else %}{{- '<|start|>' + message.role + '<|message|>' + message.content + '<|end|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}")
FAMILIES = {  # name -> (template, special tokens, bos, end tokens (the first: eos_token), plain added tokens)
    "qwen3": (QWEN3, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, ["<|im_end|>"], ["<think>", "</think>"]),
    "qwen3.5": (QWEN35, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, ["<|im_end|>"],
                ["<think>", "</think>"]),
    "gemma": (GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", ["<end_of_turn>", "<eos>"], []),
    "gpt-oss": (GPT_OSS, ["<|endoftext|>", "<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>"], None,
                ["<|return|>"], []),
}


def tokenizer(folder, name: str, thinking: str = "context"):
    """The family's tokenizer folder (a BPE trained here, the family's special tokens) taken by the tokenizer stage
    as base.init_from would; and transformers' tokenizer with the same template, to compare with."""
    template, specials, bos, ends, plain = FAMILIES[name]
    texts = [" ".join(random.Random(i).choices(WORDS, k=12)) for i in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "eos_token": ends[0],
        "bos_token": bos}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id(e) for e in ends]}))
    ours = make_tokenizer(TokenizerConfig(vocab_size=400, chat_format="auto", thinking=thinking), [], str(folder), "t")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), chat_template=template,
                                              bos_token=bos, eos_token=ends[0])
    return ours, hf


def split(tok, conv):
    """(trained text, untrained text) of a conversation's last row."""
    ids, mask = render(conv, tok)
    decode = lambda keep: tok.decode([i for i, m in zip(ids, mask) if m == keep], skip_special_tokens=False)  # noqa
    return decode(True), decode(False)


ASK = [{"role": "user", "content": "Which river?"}]


@pytest.mark.parametrize("name", ["qwen3", "qwen3.5"])
def test_an_empty_think_block_is_context_never_an_answer(name, tmp_path):
    tok, hf = tokenizer(tmp_path, name)
    trained, untrained = split(tok, ASK + [{"role": "assistant", "content": "Osk"}])
    assert trained == "Osk<|im_end|>" and untrained.endswith("assistant\n<think>\n\n</think>\n\n\n")  # + after end
    # served as trained: the prompt is the template's with thinking off, and exactly what preceded the answer
    prompt = render_prompt(ASK, tok)
    assert prompt == hf.apply_chat_template(ASK, add_generation_prompt=True, enable_thinking=False, tokenize=True,
                                            return_dict=True)["input_ids"]
    ids, mask = render(ASK + [{"role": "assistant", "content": "Osk"}], tok)
    assert ids[: mask.index(True)] == prompt
    # an answer with reasoning keeps it trained (after the `<think>` Qwen3.5's own prompt opens)
    trained, _ = split(tok, ASK + [{"role": "assistant", "content": "<think>\nrivers\n</think>\n\nOsk"}])
    assert trained == ("<think>\nrivers\n</think>\n\nOsk<|im_end|>" if name == "qwen3" else
                       "rivers\n</think>\n\nOsk<|im_end|>")


def test_thinking_train_trains_the_empty_block_with_the_answer(tmp_path):
    tok, hf = tokenizer(tmp_path, "qwen3", thinking="train")
    trained, _ = split(tok, ASK + [{"role": "assistant", "content": "Osk"}])
    assert trained == "<think>\n\n</think>\n\nOsk<|im_end|>"
    assert render_prompt(ASK, tok) == hf.apply_chat_template(ASK, add_generation_prompt=True, tokenize=True,
                                                             return_dict=True)["input_ids"]


def test_dev_prompts_during_training_end_with_the_empty_block_as_trained(tmp_path):
    tok, _ = tokenizer(tmp_path, "qwen3")
    convs = [ASK + [{"role": "assistant", "content": w}] for w in ("Osk", "Velmora", "42")]
    rendered = [render(c, tok) for c in convs]
    rows = [np.array(ids, np.int32) for ids, _ in rendered]
    labels = [np.where(mask, ids, -100).astype(np.int32) for ids, mask in rendered]
    prompts = dev_prompts(pack(rows, labels, config("pack", block_size=128))[0], tok, 3)
    empty = text_tokenizer(tok).encode("<think>\n\n</think>\n\n", add_special_tokens=False).ids
    assert len(prompts) == 3 and all(p[-len(empty):] == empty for p, _ in prompts)
    assert sorted(gold for _, gold in prompts) == ["42", "Osk", "Velmora"]


def test_gemma_refusing_roles_that_do_not_alternate_is_a_bad_row_with_its_message(tmp_path):
    tok, _ = tokenizer(tmp_path / "tok", "gemma")
    system = [{"role": "system", "content": "Be brief."}] + ASK + [{"role": "assistant", "content": "Osk"}]
    trained, untrained = split(tok, system)
    assert trained == "Osk<end_of_turn>" and "<start_of_turn>user\nBe brief.\n\nWhich river?" in untrained
    data = tmp_path / "train.jsonl"
    bad = ASK + ASK + [{"role": "assistant", "content": "Osk"}]  # two user turns in a row
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in (system, bad)))
    with pytest.raises(UserError, match=r"train.jsonl:2: template_refused \(Conversation roles must alternate "
                                        r"user/assistant/user/assistant/...\)"):
        render_split(str(data), tok, config("render"), str(tmp_path / "out.parquet"))
    report = render_split(str(data), tok, config("render", on_error="skip"), str(tmp_path / "out.parquet"))
    assert report["rows_kept"] == 1 and report["dropped"] == {"template_refused": 1}


def test_gpt_oss_channels_are_trained_and_history_is_served_as_the_template_writes_it(tmp_path):
    tok, hf = tokenizer(tmp_path, "gpt-oss")
    conv = ASK + [{"role": "assistant", "content": "Osk"}, {"role": "user", "content": "Why?"},
                  {"role": "assistant", "content": "It flows there.", "thinking": "The river is Osk."}]
    trained, untrained = split(tok, conv)  # the last row: the last answer as served
    assert trained == ("<|channel|>analysis<|message|>The river is Osk.<|end|><|start|>assistant<|channel|>final"
                       "<|message|>It flows there.<|return|>")
    assert "<|channel|>final<|message|>Osk<|end|>" in untrained  # the earlier answer as history: untrained
    trained, _ = split(tok, conv[:2])
    assert trained == "<|channel|>final<|message|>Osk<|return|>"
    assert render_prompt(conv[:3], tok) == hf.apply_chat_template(conv[:3], add_generation_prompt=True,
                                                                  tokenize=True, return_dict=True)["input_ids"]
