"""Chat with a model folder in the terminal: `python -m pipeline.chat MODEL_DIR`. Multi-turn, through the same
renderer (pipeline.template) and decoding (pipeline.generate) as training and evaluation. On a terminal it is
interactive (/reset forgets the conversation, /quit or Ctrl-D ends); with stdin from a pipe or file, stdin is
one user message (or, with --lines, each non-empty line is the next user turn) and only the answers are printed."""
import argparse
import sys

from pipeline.common import UserError, one_line_errors, setup_compute
from pipeline.data import read_conversations
from pipeline.generate import Sampling, generate
from pipeline.backend import load_model
from pipeline.template import layout, render_prompt
from pipeline.tokenizer import load_tokenizer


class Chat:
    """A conversation with one model: `ask(text)` appends the user turn and the model's answer."""

    def __init__(self, model_dir: str, sampling: Sampling, max_new_tokens: int, device: str = "auto",
                 system: str = "", history: list[dict] | None = None, compile: bool = False):
        self.compute = setup_compute(device, "float32")
        self.model = load_model(model_dir, device=self.compute.device).eval()  # its backend: auto
        self.tok = load_tokenizer(model_dir)
        self.ends = layout(self.tok).ends  # every id that ends an answer
        self.sampling, self.max_new_tokens, self.compile = sampling, max_new_tokens, compile
        self.start = ([{"role": "system", "content": system}] if system else []) + list(history or [])
        self.messages = list(self.start)
        self.turns = 0

    def reset(self) -> None:
        self.messages, self.turns = list(self.start), 0

    def prompt_ids(self) -> list[int]:
        """The conversation rendered up to the assistant header; the oldest exchanges are dropped (the system message
        is kept) while it does not fit the model's context with room for the answer."""
        limit = self.model.arch.max_seq_len - self.max_new_tokens
        ids = render_prompt(self.messages, self.tok)
        while len(ids) > limit:
            first = 1 if self.messages[0]["role"] == "system" else 0
            if len(self.messages) - first <= 1:
                raise ValueError(f"the message is {len(ids)} tokens; the model takes {limit} plus the answer")
            del self.messages[first : first + 2]  # one user + assistant exchange
            print("(oldest exchange dropped to fit the context)", file=sys.stderr)
            ids = render_prompt(self.messages, self.tok)
        return ids

    def ask(self, text: str) -> tuple[str, bool]:
        """The model's answer to `text` given the conversation so far, and whether it stopped at the end token."""
        self.messages.append({"role": "user", "content": text})
        sampling = Sampling(self.sampling.temperature, self.sampling.top_k, self.sampling.top_p,
                            self.sampling.seed + self.turns)  # a fresh draw each turn, reproducible per seed
        out = generate(self.model, [self.prompt_ids()], self.max_new_tokens, self.ends, sampling, self.compile)[0]
        stopped = bool(out) and out[-1] in self.ends
        answer = self.tok.decode(out[:-1] if stopped else out).strip()
        self.messages.append({"role": "assistant", "content": answer or "..."})  # content must not be empty
        self.turns += 1
        return answer, stopped


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pipeline.chat", description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", help="a model folder (config.json, model.safetensors, tokenizer.json)")
    ap.add_argument("--system", default="", help="a system message that starts the conversation")
    ap.add_argument("--history", help="JSONL file: its first conversation ({'messages': [...]}) is the start")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--lines", action="store_true", help="piped stdin: each non-empty line is a user turn")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decoding step: a minute or more "
                    "before the first answer, then faster tokens at batch 1 on a CPU (BENCHMARKS.md)")
    return ap.parse_args(argv)


def interactive(chat: Chat) -> None:
    print("chat: /reset starts over, /quit (or Ctrl-D) ends", file=sys.stderr)
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            chat.reset()
            continue
        if text:
            answer, stopped = chat.ask(text)
            print(f"assistant> {answer}" + ("" if stopped else "  [no end token within --max-new-tokens]"))


def main(argv=None) -> None:
    args = parse_args(argv)
    history = None
    if args.history:
        conversations = read_conversations(args.history)
        if not conversations:
            raise UserError(f"{args.history}: no conversation; --history takes a JSONL file of conversations")
        history = conversations[0]
    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    chat = Chat(args.model_dir, sampling, args.max_new_tokens, args.device, args.system, history, args.compile)
    if sys.stdin.isatty():
        interactive(chat)
        return
    text = sys.stdin.read()
    turns = [line.strip() for line in text.splitlines() if line.strip()] if args.lines else [text.strip()]
    if not any(turns):
        raise UserError("empty input on stdin; pipe a message in, or run on a terminal to chat")
    for turn in turns:
        print(chat.ask(turn)[0], flush=True)


if __name__ == "__main__":
    with one_line_errors("chat"):
        main()
