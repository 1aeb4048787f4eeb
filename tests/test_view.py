import json
import re

from pipeline.tokenizer import save_tokenizer
from pipeline.view import GREEN, RED, RESET, main, sample
from tests.conftest import CONVERSATIONS


def test_viewer_colours_trained_green_and_masked_red(tok, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the defaults apply
    save_tokenizer(tok, str(tmp_path / "tok"))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n")
    (tmp_path / "src" / "b.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    main([str(tmp_path / "src"), "--tokenizer", str(tmp_path / "tok"), "--rows", "2", "--color", "always",
          "--html", str(tmp_path / "v.html")])
    out = capsys.readouterr().out
    assert out.count("== a, row") == 1 and out.count("== b, row") == 2
    green = re.findall(re.escape(GREEN) + "(.*?)" + re.escape(RESET), out, re.S)
    red = re.findall(re.escape(RED) + "(.*?)" + re.escape(RESET), out, re.S)
    assert " Mira Tal" in green and "<|end|>" in green  # the answer and its closing marker are trained
    assert " Who is the mayor of Velmora?" in red and "<|assistant|>" in red and "<|user|>" in red
    page = (tmp_path / "v.html").read_text()
    assert '<span class="t"> Mira Tal</span>' in page and '<span class="m">&lt;|assistant|&gt;</span>' in page
    main([str(tmp_path / "src" / "a.jsonl"), "--tokenizer", str(tmp_path / "tok"), "--color", "never",
          "--train-on", "everything"])
    assert "«<|user|>»«" in capsys.readouterr().out


def test_sample_is_seeded_and_per_source(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": CONVERSATIONS[i % 4]}) + "\n" for i in range(50)))
    a = sample(str(path), 3, 1, "fail")["d"]
    assert len(a) == 3 and a == sample(str(path), 3, 1, "fail")["d"] and [r for r, _ in a] == sorted(r for r, _ in a)
    assert len({tuple(r for r, _ in sample(str(path), 3, s, "fail")["d"]) for s in range(5)}) > 1  # seeds differ
    assert any(r >= 3 for s in range(5) for r, _ in sample(str(path), 3, s, "fail")["d"])  # not just the first rows
