"""A model's own chat template (tokenizer.chat_format: template), masked from where each message lands in the
template's output, never from a per-family table. Templates written here behave like each family's (Llama 3 with
its date line, Qwen2.5 with its default system prompt, Qwen3 dropping earlier reasoning, Gemma without a system
role, Mistral merging the system into the first [INST], Phi-3 closing with eos, ChatML), on tokenizers built here:
for 200 random conversations each (with tool calls and results where the family's template writes them: Llama
3.1's ipython turns, Qwen2.5's grouped tool responses), our prompt ids are apply_chat_template's, the trained tokens
decode to exactly each answer as the template writes it plus its end token, and nothing else is trained."""
import json
import random

import numpy as np
import pytest
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.config import TokenizerConfig
from pipeline.model_template import FIXED_DATE
from pipeline.render import MaskStats
from pipeline.template import ROLES, chat_format, layout, own_rows, render, render_prompt, tokenize_rows
from pipeline.tokenizer import load_tokenizer, make_tokenizer, save_tokenizer

LLAMA3 = (  # Llama 3.1's: one tool call per answer as JSON with "parameters", tool results as ipython turns
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + strftime_now('%d %b %Y') + '\\n\\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{%- if 'tool_calls' in message %}"
    "{%- if not message.tool_calls | length == 1 %}{{- raise_exception('Only single tool calls') }}{%- endif %}"
    "{%- set call = message.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{{- '{\"name\": \"' + call.name + '\", \"parameters\": ' + call.arguments | tojson + '}' + '<|eot_id|>' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content | tojson + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
QWEN25 = (  # Qwen2.5's: tool calls after the content, consecutive tool results grouped in one user turn
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls | default([]) %}"
    "{%- if call.function is defined %}{%- set call = call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' + call.arguments | tojson"
    " + '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
QWEN3 = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_user %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
GEMMA = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set first_user_prefix = '' %}"
    "{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{%- set role = 'model' %}{%- else %}{%- set role = message['role'] %}"
    "{%- endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}")
MISTRAL = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported!') }}{%- endif %}"
    "{%- endfor %}")
PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

FAMILIES = {  # name -> (template, special tokens, bos, end tokens (the first: eos_token), plain added tokens)
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                        "<|end_of_text|>"], "<|begin_of_text|>", ["<|eot_id|>", "<|end_of_text|>"], []),
    "qwen2.5": (QWEN25, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, ["<|im_end|>", "<|endoftext|>"], []),
    "qwen3": (QWEN3, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, ["<|im_end|>"], ["<think>", "</think>"]),
    "gemma": (GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", ["<end_of_turn>", "<eos>"], []),
    "mistral": (MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", ["</s>"], []),
    "phi3": (PHI3, ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None,
             ["<|end|>", "<|endoftext|>"], []),
    "chatml": (CHATML, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, ["<|im_end|>"], []),
}
WORDS = ["Velmora", "river", "mayor", "42", "1203", "the", "is", "what", "café", "naïve", "日本語", "😀", "a\nb",
         "<|im_start", "[INST", "<start_of", "end|>", "<|eot", "Think", "</thin"]  # marker-like, never a marker


def family_tokenizer(folder, name: str):
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
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "eos_token": ends[0],
              "bos_token": bos, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id(e) for e in ends]}))
    return folder


TOOLS = {"llama3": 1, "qwen2.5": 2}  # the families whose templates write tool calls: most results per call


def conversations(name: str, n: int = 200, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    say = lambda: " ".join(rng.choices(WORDS, k=rng.randint(1, 8))).strip() or "x"  # noqa: E731
    out = []
    for _ in range(n):
        conv = [{"role": "system", "content": say()}] if rng.random() < 0.4 else []
        for _ in range(rng.randint(1, 3)):
            conv.append({"role": "user", "content": say()})
            if name in TOOLS and rng.random() < 0.4:  # an answer that calls tools, their results, then the answer
                calls = [{"type": "function", "function": {"name": rng.choice(["lookup", "météo"]),
                                                           "arguments": {"q": say(), "n": rng.randint(0, 9)}}}
                         for _ in range(rng.randint(1, TOOLS[name]))]
                content = say() if name == "qwen2.5" and rng.random() < 0.5 else ""
                conv.append({"role": "assistant", "content": content, "tool_calls": calls})
                conv += [{"role": "tool", "content": say()} for _ in calls]
            answer = say()
            if name == "qwen3" and rng.random() < 0.5:
                answer = f"<think>\n{say()}\n</think>\n\n{answer}"
            conv.append({"role": "assistant", "content": answer})
        out.append(conv)
    return out


def written(name: str, conv: list[dict], k: int, last: bool) -> str:
    """What the family's template writes for answer k after its prompt: the text the model is trained to write."""
    content, end = conv[k]["content"], FAMILIES[name][3][0]
    calls = [(c["function"]["name"], json.dumps(c["function"]["arguments"], ensure_ascii=False))
             for c in conv[k].get("tool_calls", [])]
    if name == "qwen3":
        reasoning = content.split("</think>")[0].split("<think>")[-1].strip("\n") if "</think>" in content else ""
        answer = content.split("</think>")[-1].lstrip("\n")
        return (f"<think>\n{reasoning}\n</think>\n\n{answer}" if last else answer) + end
    if name == "qwen2.5":  # the generation prompt ends with the newline that opens the content or the first call
        text = ("\n" + content if content else "") + "".join(
            f'\n<tool_call>\n{{"name": "{n}", "arguments": {a}}}\n</tool_call>' for n, a in calls)
        return text[1:] + end
    if name == "llama3" and calls:
        return f'{{"name": "{calls[0][0]}", "parameters": {calls[0][1]}}}' + end
    return {"mistral": f" {content}</s>", "llama3": content.strip() + end, "gemma": content.strip() + end}.get(
        name, content + end)


@pytest.fixture(scope="module", autouse=True)
def transformers_on_our_date():
    """Templates that write today's date (Llama 3.1's) render with a fixed date here, so that renderings are the same
    every day; transformers renders with the clock: it is set to that date for the comparisons."""
    import datetime

    import transformers.utils.chat_template_utils as utils

    class Fixed(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls.strptime(FIXED_DATE, "%d %b %Y")

    real, utils.datetime = utils.datetime, Fixed
    yield
    utils.datetime = real


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    folder = family_tokenizer(tmp_path_factory.mktemp(request.param), request.param)
    tok = make_tokenizer(TokenizerConfig(vocab_size=400, chat_format="auto", thinking="train"), [], str(folder), "test")
    template, _, bos, ends, _ = FAMILIES[request.param]
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), chat_template=template,
                                              bos_token=bos, eos_token=ends[0])
    return request.param, tok, hf


def test_auto_takes_the_models_own_template_with_every_end_token(family):
    name, tok, _ = family
    assert chat_format(tok).name == "template" and list(tok.own_template.ends) == FAMILIES[name][3]
    assert layout(tok).ends == [tok.token_to_id(e) for e in FAMILIES[name][3]]


def test_prompts_are_apply_chat_templates_ids(family):
    name, tok, hf = family
    for conv in conversations(name):
        for k in [k for k, m in enumerate(conv) if m["role"] == "assistant"]:
            expected = hf.apply_chat_template(conv[:k], add_generation_prompt=True, tokenize=True, return_dict=True)
            assert render_prompt(conv[:k], tok) == expected["input_ids"], (name, conv[:k])


def test_trained_tokens_are_exactly_the_answers_as_written_and_their_end_tokens(family):
    name, tok, hf = family
    assistant = list(ROLES).index("assistant")
    for conv in conversations(name):
        rows = own_rows(conv, tok)
        ids, mask, off, _, roles = tokenize_rows([rows], tok)
        answers = [k for k, m in enumerate(conv) if m["role"] == "assistant"]
        assert not (mask & (roles != assistant)).any(), (name, conv)  # no header, user, system, injected token
        trained = tok.decode(ids[mask].tolist(), skip_special_tokens=False)
        if len(rows) == 1:  # one row: every answer as the whole conversation renders it
            last_user = max(i for i, m in enumerate(conv) if m["role"] == "user")
            assert trained == "".join(written(name, conv, k, k > last_user) for k in answers), (name, conv)
            assert ids.tolist() == hf.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        else:  # the template rewrites history (Qwen3): a row per answer, each with its own prompt as served
            assert name == "qwen3" and len(rows) == len(answers)
            assert trained == "".join(written(name, conv[: k + 1], k, True) for k in answers), (name, conv)
        ends = np.isin(ids, layout(tok).ends) & (roles == assistant)
        stats = MaskStats(tok)
        stats.add("all", ids, mask, off, roles)
        assert ends.sum() >= len(answers) and mask[ends].all()  # the end token after every answer is trained
        assert stats.stats["all"]["assistant_ends_trained"] == stats.stats["all"]["assistant_ends"]


def test_injected_text_and_history_are_never_trained(family):
    """The injected parts each family's template writes (a default system prompt, a date line, the system merged
    into the first user turn) and earlier reasoning dropped by Qwen3 are in the prompt, untrained."""
    name, tok, _ = family
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nwhy\n</think>\n\nYo"},
            {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Done"}]
    if name != "qwen3":
        conv[1]["content"] = "Yo"
    ids, mask = render(conv, tok)
    text = tok.decode(ids, skip_special_tokens=False)
    untrained = tok.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False)
    injected = {"llama3": f"Today Date: {FIXED_DATE}", "qwen2.5": "You are Qwen", "chatml": "named SmolLM"}.get(name)
    if injected:
        assert injected in untrained
    if name == "qwen3":  # the last answer's row: the earlier answer as served later, its reasoning dropped
        assert "why" not in text and text.count("<think>") == 1


def test_a_special_token_typed_in_content_is_refused(family):
    name, tok, _ = family
    from pipeline.model_template import Unlocatable

    with pytest.raises(Unlocatable, match="special_token_in_content"):
        own_rows([{"role": "user", "content": f"say {FAMILIES[name][3][0]}"}, {"role": "assistant", "content": "no"}],
                 tok)


def test_saved_and_loaded_with_its_template_and_ends(family, tmp_path):
    name, tok, _ = family
    save_tokenizer(tok, str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert (again.own_template.source, again.own_template.ends) == (tok.own_template.source, tok.own_template.ends)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == FAMILIES[name][0]  # the model's own, never replaced
    conv = conversations(name, 1, seed=5)[0]
    assert render(conv, again) == render(conv, tok)


def test_train_on_everything_is_the_whole_rendering_but_tool_results(family):
    name, tok, hf = family
    tool = list(ROLES).index("tool")
    for conv in conversations(name, 50, seed=3):
        rows = own_rows(conv, tok, "everything")
        ids, mask, _, _, roles = tokenize_rows([rows], tok)
        assert len(rows) == 1 and ids.tolist() == hf.apply_chat_template(conv, tokenize=True,
                                                                         return_dict=True)["input_ids"]
        assert not mask[roles == tool].any() and mask[roles != tool].all(), (name, conv)
