import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.chat import Chat, main
from pipeline.common import UserError
from pipeline.generate import GREEDY, Sampling, generate
from pipeline.hf import save_model
from pipeline.template import END, render_prompt
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("chatmodel")
    save_model(tiny_model(tok.get_vocab_size(), seed=4), tok, str(path))  # max_seq_len 128
    return str(path)


def test_multi_turn_uses_the_renderer_and_generation(tok, folder):
    chat = Chat(folder, GREEDY, max_new_tokens=5, device="cpu", system="Answer briefly.")
    first, _ = chat.ask("Who is the mayor of Velmora?")
    second, _ = chat.ask("When was it founded?")
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    # the second answer is what generate() gives for the whole conversation rendered by the one renderer
    prompt = render_prompt(chat.messages[:-1], tok)
    out = generate(chat.model, [prompt], 5, tok.token_to_id(END))[0]
    assert second == tok.decode([t for t in out if t != tok.token_to_id(END)]).strip()
    chat.reset()
    assert [m["role"] for m in chat.messages] == ["system"]


def test_old_exchanges_are_dropped_to_fit_the_context(tok, folder):
    chat = Chat(folder, Sampling(temperature=1.0, seed=1), max_new_tokens=20, device="cpu", system="Be brief.")
    for i in range(6):
        chat.ask(f"Question number {i}: which river flows through Velmora, and when was it founded?")
        assert len(render_prompt(chat.messages[:-1], tok)) + 20 <= 128  # the prompt it answered fit the context
    assert chat.messages[0]["role"] == "system" and len(chat.messages) < 2 * 6 + 1


def run_cli(folder: str, stdin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.chat", folder, "--max-new-tokens", "5", *args],
                          input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_reads_stdin_one_answer_per_turn(tok, folder):
    """The real entry point: `python -m pipeline.chat MODEL_DIR --lines`, two user turns on stdin."""
    turns = run_cli(folder, "Who is the mayor of Velmora?\n\nWhen was it founded?\n", "--lines")
    assert turns.returncode == 0, turns.stderr
    chat = Chat(folder, GREEDY, max_new_tokens=5, device="cpu")
    expected = [chat.ask("Who is the mayor of Velmora?")[0], chat.ask("When was it founded?")[0]]
    assert turns.stdout.splitlines() == expected


def cli(monkeypatch, capsys, stdin: str, *args: str) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))  # not a terminal: read as a script would pipe it
    main([*args])
    return capsys.readouterr().out


def test_cli_prompt_history_and_errors(folder, tmp_path, monkeypatch, capsys):
    text = "Which river flows through Velmora?\nAnswer from this passage: the Osk flows through Velmora."
    out = cli(monkeypatch, capsys, text, folder, "--max-new-tokens", "5")
    assert out == Chat(folder, GREEDY, max_new_tokens=5, device="cpu").ask(text)[0] + "\n"  # stdin: one message
    history = tmp_path / "history.jsonl"
    start = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    history.write_text(json.dumps({"messages": start}) + "\n")
    out = cli(monkeypatch, capsys, "And you?", folder, "--max-new-tokens", "5", "--history", str(history))
    assert out == Chat(folder, GREEDY, max_new_tokens=5, device="cpu", history=start).ask("And you?")[0] + "\n"
    with pytest.raises(UserError, match="top_p"):
        cli(monkeypatch, capsys, "Hi", folder, "--top-p", "0")
    with pytest.raises(UserError, match="empty input"):
        cli(monkeypatch, capsys, "   \n", folder)


def test_cli_user_errors_are_one_line(folder, tmp_path):
    empty = run_cli(folder, "   \n")
    assert empty.returncode == 1 and empty.stdout == ""
    assert empty.stderr == "chat: empty input on stdin; pipe a message in, or run on a terminal to chat\n"
    missing = run_cli(str(tmp_path / "nowhere"), "Hi")
    assert missing.returncode == 1 and len(missing.stderr.splitlines()) == 1, missing.stderr
    assert missing.stderr.startswith(f"chat: {tmp_path / 'nowhere'}: no config.json")


def test_interactive_chat_on_a_terminal(folder):
    """On a real pseudo-terminal: the prompt, an answer per turn, /reset forgets the conversation, Ctrl-D ends."""
    import os
    import pty
    import select

    expected = Chat(folder, GREEDY, max_new_tokens=5, device="cpu")
    first = expected.ask("Who is the mayor of Velmora?")[0]
    second = expected.ask("When was it founded?")[0]
    main_fd, term = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.chat", folder, "--max-new-tokens", "5"], cwd=ROOT,
                            stdin=term, stdout=term, stderr=term, close_fds=True)
    os.close(term)
    seen = b""

    def until(marker: bytes) -> str:
        """Terminal output up to the next `marker` (the CLI waits for input there)."""
        nonlocal seen
        while marker not in seen:
            ready, _, _ = select.select([main_fd], [], [], 60)
            assert ready, f"no {marker!r} from the chat within 60 s; got {seen!r}"
            seen += os.read(main_fd, 4096)
        text, seen = seen.split(marker, 1)
        return text.decode().replace("\r\n", "\n")

    try:
        assert "/reset starts over" in until(b"you> ")
        os.write(main_fd, b"Who is the mayor of Velmora?\n")
        assert f"assistant> {first}" in until(b"you> ")
        os.write(main_fd, b"When was it founded?\n")
        assert f"assistant> {second}" in until(b"you> ")  # the second turn sees the first
        os.write(main_fd, b"/reset\n")
        until(b"you> ")
        os.write(main_fd, b"Who is the mayor of Velmora?\n")
        assert f"assistant> {first}" in until(b"you> ")  # a fresh conversation: the first answer again
        os.write(main_fd, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(main_fd)
