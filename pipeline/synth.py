"""The bundled default data: a seeded fictional world of towns and people, written as a pretraining corpus
(corpus.jsonl, {"text"}) and chat splits (train/dev/heldout.jsonl, {"messages"}) whose answers are short spans,
plus mc.jsonl: multiple-choice questions (options `a) ...` to `d) ...`, the gold answer a letter) about known facts,
and suites/world.jsonl, a general-ability suite (pipeline/suites.py) of what the chat data does not teach.
A fixed fraction of (entity, attribute) facts is stated in the corpus but asked about only in heldout.jsonl.
Randomness comes only from random.Random streams seeded by cfg.seed, so a seed gives byte-identical files."""
import itertools
import json
import random
from dataclasses import asdict
from pathlib import Path

from pipeline.config import MAX_SYLLABLES, SYNTH_TASKS, SynthConfig

ONSETS = "b d f g k l m n p r s t v z br dr kr st th sh".split()
VOWELS = "a e i o u".split()
CODAS = ["", "n", "r", "l", "s", "k"]
SYLLABLES = [o + v for o in ONSETS for v in VOWELS]
assert len(SYLLABLES) == MAX_SYLLABLES, "pipeline/config.py checks synth.n_syllables against this inventory"
PROFESSIONS = "baker potter weaver smith miller fisher carpenter tailor mason brewer healer scribe sailor".split()
COLOURS = "red blue green yellow orange purple white black grey brown pink silver".split()
PRODUCTS = "wool salt glass cheese copper paper honey timber silk pottery wine iron amber rope lace tea".split()
ATTRS = {"town": ["region", "river", "founded", "product", "mayor"],
         "person": ["hometown", "profession", "age", "colour", "pet"]}
LINKS = ("mayor", "hometown")  # attributes whose value is another entity of the world
SYSTEM_PROMPTS = [
    "You are a concise assistant. Answer with a short phrase.",
    "You are a helpful assistant. Reply with just the answer.",
    "Answer briefly, with a word, a name or a number.",
    "You are a quiz assistant. Give only the answer.",
    "Keep answers short. No full sentences.",
]
PASSAGE_FORMS = [
    "{p}\n\nQuestion: {q}",
    "Read the passage and answer the question.\n\nPassage: {p}\n\nQuestion: {q}",
    "Text: {p}\nQuestion: {q}",
    "{q}\nAnswer from this passage: {p}",
]
ARITH_ASK = ["What is {a} {op} {b}?", "What is {a} {sym} {b}?", "Compute {a} {sym} {b}.", "How much is {a} {op} {b}?",
             "{a} {sym} {b} = ?"]
ARITH_SAY = ["{a} {op} {b} is {c}.", "{a} {sym} {b} = {c}.", "{a} {op} {b} equals {c}."]
CORPUS_QA = ["{q} {v}.", "{q} The answer is {v}.", "{q} It is {v}."]
GROUPS = {"region": ["The towns of {g} are {towns}.", "{towns} all lie in the region of {g}."],
          "river": ["The river {g} flows through {towns}.", "Towns on the {g} include {towns}."]}
# Per attribute: statements (corpus, passages), questions naming the entity, follow-ups with a pronoun.
TEMPLATES = {
    "region": dict(say=["{e} is a town in {v}.", "{e} lies in the region of {v}.", "The town of {e} is part of {v}.",
                        "{v} is the region where {e} is found."],
                   ask=["Which region is {e} in?", "In what region does {e} lie?", "What region is {e} part of?"],
                   follow=["Which region is it in?", "What region is it part of?"]),
    "river": dict(say=["The river {v} flows through {e}.", "The {v} runs through the town of {e}.",
                       "{e}'s river is the {v}.", "{e} lies on the river {v}."],
                  ask=["Which river flows through {e}?", "What river runs through {e}?", "{e} lies on which river?"],
                  follow=["Which river flows through it?", "What river runs through it?"]),
    "founded": dict(say=["{e} was founded in {v}.", "The town of {e} dates from {v}.", "In {v}, {e} was founded.",
                         "{e} has stood since {v}."],
                    ask=["When was {e} founded?", "In what year was {e} founded?", "What year does {e} date from?"],
                    follow=["When was it founded?", "In what year was it founded?"]),
    "product": dict(say=["{e} is known for its {v}.", "The town of {e} is famous for {v}.",
                         "The main product of {e} is {v}.", "People know {e} for its {v}."],
                    ask=["What is {e} known for?", "What is the main product of {e}?", "What is {e} famous for?"],
                    follow=["What is it known for?", "What is it famous for?"]),
    "mayor": dict(say=["The mayor of {e} is {v}.", "{v} is the mayor of {e}.", "{e} is led by its mayor, {v}.",
                       "{v} serves as mayor of {e}."],
                  ask=["Who is the mayor of {e}?", "Who leads {e} as mayor?", "Who is {e}'s mayor?"],
                  follow=["Who is its mayor?", "Who is the mayor there?"]),
    "hometown": dict(say=["{e} lives in {v}.", "{e} is from the town of {v}.", "{v} is the hometown of {e}.",
                          "{e} comes from {v}."],
                     ask=["Where is {e} from?", "Which town does {e} live in?", "What is the hometown of {e}?"],
                     follow=["Where are they from?", "Which town do they live in?"]),
    "profession": dict(say=["{e} works as a {v}.", "{e} is a {v} by trade.", "By profession, {e} is a {v}.",
                            "{e} earns a living as a {v}."],
                       ask=["What does {e} do for a living?", "What is the profession of {e}?", "What is {e}'s job?"],
                       follow=["What do they do for a living?", "What is their job?"]),
    "age": dict(say=["{e} is {v} years old.", "{e} is aged {v}.", "The age of {e} is {v}.", "{e} is {v}."],
                ask=["How old is {e}?", "What is the age of {e}?", "What age is {e}?"],
                follow=["How old are they?", "What is their age?"]),
    "colour": dict(say=["{e}'s favourite colour is {v}.", "The favourite colour of {e} is {v}.",
                        "{e} likes the colour {v} best.", "Of all colours, {e} prefers {v}."],
                   ask=["What is {e}'s favourite colour?", "Which colour does {e} like best?",
                        "What colour does {e} prefer?"],
                   follow=["What is their favourite colour?", "Which colour do they like best?"]),
    "pet": dict(say=["{e} has a pet named {v}.", "{e}'s pet is called {v}.", "{v} is the name of {e}'s pet.",
                     "{e} keeps a pet called {v}."],
                ask=["What is the name of {e}'s pet?", "What is {e}'s pet called?", "What is the pet of {e} called?"],
                follow=["What is their pet called?", "What is the name of their pet?"]),
}


def word(rng: random.Random, syllables: list[str], taken: set = frozenset()) -> str:
    """Two syllables and an optional coda, capitalized, not in `taken`: "Voda", "Drigen", "Mibrin"."""
    while (w := (rng.choice(syllables) + rng.choice(syllables) + rng.choice(CODAS)).capitalize()) in taken:
        pass
    return w


def make_names(rng: random.Random, syllables: list[str], n: int, used: list[str]) -> list[str]:
    """n new capitalized words, unique and none a prefix of another (so containment scoring stays honest)."""
    out = []
    for _ in range(1000 * n):
        w = word(rng, syllables)
        if not any(w.startswith(u) or u.startswith(w) for u in used):
            used.append(w)
            out.append(w)
            if len(out) == n:
                return out
    raise ValueError(f"could not draw {n} unique names; raise synth.n_syllables")


def town(rng: random.Random, region: str, river: str, mayor: str) -> dict:
    return {"kind": "town", "region": region, "river": river, "founded": str(rng.randint(1050, 1890)),
            "product": rng.choice(PRODUCTS), "mayor": mayor}


def person(rng: random.Random, hometown: str, pet: str) -> dict:
    return {"kind": "person", "hometown": hometown, "profession": rng.choice(PROFESSIONS),
            "age": str(rng.randint(18, 90)), "colour": rng.choice(COLOURS), "pet": pet}


def build_world(cfg: SynthConfig, rng: random.Random) -> tuple[dict, list[str]]:
    """name -> {"kind", attr: value} for every town and person (values are strings), and the syllables used."""
    syllables, used = rng.sample(SYLLABLES, cfg.n_syllables), []
    regions, rivers = make_names(rng, syllables, cfg.n_regions, used), make_names(rng, syllables, cfg.n_rivers, used)
    towns = make_names(rng, syllables, cfg.n_towns, used)
    firsts, lasts = make_names(rng, syllables, cfg.n_people, used), make_names(rng, syllables, cfg.n_people, used)
    people = [f"{first} {last}" for first, last in zip(firsts, lasts)]
    pets = make_names(rng, syllables, cfg.n_people, used)
    ents = {t: town(rng, rng.choice(regions), rng.choice(rivers), mayor=p) for t, p in zip(towns, people)}
    for i, p in enumerate(people):  # a mayor lives in the town they lead
        ents[p] = person(rng, towns[i] if i < len(towns) else rng.choice(towns), pets[i])
    return ents, syllables


def sentence(rng: random.Random, name: str, attr: str, value: str, question_frac: float) -> str:
    if rng.random() < question_frac:
        q = rng.choice(TEMPLATES[attr]["ask"]).format(e=name)
        return rng.choice(CORPUS_QA).format(q=q, v=value)
    return rng.choice(TEMPLATES[attr]["say"]).format(e=name, v=value)


def listing(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def build_corpus(cfg: SynthConfig, rng: random.Random, ents: dict, syllables: list[str]) -> list[str]:
    """Encyclopedia-style documents: each restates all facts of one entity (plus up to two facts that point at
    it, e.g. a town's residents) in shuffled order and varied phrasing; then group lists and worked sums."""
    incoming = {name: [] for name in ents}
    for name, ent in ents.items():
        for attr in LINKS:
            if attr in ent:
                incoming[ent[attr]].append((name, attr))
    docs = []
    for name, ent in ents.items():
        for _ in range(cfg.docs_per_entity):
            facts = [(name, a) for a in ATTRS[ent["kind"]]] + rng.sample(incoming[name], min(2, len(incoming[name])))
            rng.shuffle(facts)
            body = " ".join(sentence(rng, e, a, ents[e][a], cfg.corpus_question_frac) for e, a in facts)
            docs.append(rng.choice(["", f"{name}\n", f"{name}. "]) + body)
    for attr, forms in GROUPS.items():
        groups = {}
        for name, ent in ents.items():
            if ent["kind"] == "town":
                groups.setdefault(ent[attr], []).append(name)
        for g, towns in groups.items():
            docs += [rng.choice(forms).format(g=g, towns=listing(rng.sample(towns, len(towns))))
                     for _ in range(cfg.docs_per_group)]
    for _ in range(cfg.n_arith_docs):
        docs.append(" ".join(rng.choice(ARITH_SAY).format(**arith(rng, cfg.arith_max)) for _ in range(8)))
    taken = world_words(ents)
    docs += [reading_doc(rng, syllables, taken) for _ in range(cfg.n_reading_docs)]
    rng.shuffle(docs)
    return docs


def arith(rng: random.Random, hi: int) -> dict:
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    if rng.random() < 0.5:
        return dict(a=a, b=b, op="plus", sym="+", c=a + b)
    a, b = max(a, b), min(a, b)
    return dict(a=a, b=b, op="minus", sym="-", c=a - b)


def walk(rng: random.Random, ents: dict, name: str, n: int, ok) -> list[tuple[str, str]]:
    """Up to n (entity, attr) steps where ok(step); a linked answer (a mayor, a hometown) becomes the subject of
    the next step, so a pronoun in the follow-up question always means the latest entity named."""
    steps = []
    for _ in range(n):
        opts = [a for a in ATTRS[ents[name]["kind"]] if (name, a) not in steps and ok((name, a))]
        if not opts:
            break
        attr = rng.choice(opts)
        steps.append((name, attr))
        name = ents[name][attr] if attr in LINKS else name
    return steps


def world_words(ents: dict) -> set:
    """Every name word and value of the world: invented entities never reuse one."""
    return set(" ".join(ents).split()) | {v for e in ents.values() for v in e.values()}


def invented(rng: random.Random, syllables: list[str], taken: set) -> tuple[str, dict, str]:
    """An entity not in the world, described by a few of its facts: (name, facts, description)."""
    new = lambda: word(rng, syllables, taken)  # noqa: E731
    if rng.random() < 0.5:
        name, ent = new(), town(rng, new(), new(), f"{new()} {new()}")
    else:
        name, ent = f"{new()} {new()}", person(rng, new(), new())
    attrs = rng.sample(ATTRS[ent["kind"]], rng.randint(3, 5))
    return name, {a: ent[a] for a in attrs}, " ".join(sentence(rng, name, a, ent[a], 0.0) for a in attrs)


def passage_turn(rng: random.Random, syllables: list[str], taken: set) -> tuple[str, str]:
    """A question about an invented entity (not in the world), answered by a span of the passage shown with it."""
    name, facts, text = invented(rng, syllables, taken)
    attr = rng.choice(list(facts))
    q = rng.choice(TEMPLATES[attr]["ask"]).format(e=name)
    return rng.choice(PASSAGE_FORMS).format(p=text, q=q), facts[attr]


def reading_doc(rng: random.Random, syllables: list[str], taken: set) -> str:
    """Pretraining text that rewards reading: a description of an invented entity, then questions about it
    answered from the description (no world fact is involved)."""
    name, facts, text = invented(rng, syllables, taken)
    qa = [rng.choice(CORPUS_QA).format(q=rng.choice(TEMPLATES[a]["ask"]).format(e=name), v=facts[a])
          for a in rng.sample(list(facts), 2)]
    return " ".join([text, *qa])


def ask(rng: random.Random, ents: dict, steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(question, answer) per step: the first names its entity, the rest are pronoun follow-ups."""
    return [(rng.choice(TEMPLATES[a]["follow" if i else "ask"]).format(e=e), ents[e][a]) for i, (e, a) in
            enumerate(steps)]


def chat(system: str | None, turns: list[tuple[str, str]]) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    for q, a in turns:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def task_list(rng: random.Random, cfg: SynthConfig, n: int) -> list[str]:
    """Exactly n tasks in the configured proportions (rounded cumulatively, so they add up), shuffled."""
    cum = list(itertools.accumulate(getattr(cfg, f"frac_{t}") for t in SYNTH_TASKS))
    tasks = [t for t, lo, hi in zip(SYNTH_TASKS, [0.0] + cum, cum) for _ in range(round(n * hi) - round(n * lo))]
    tasks += ["fact"] * (n - len(tasks))  # float round-off
    rng.shuffle(tasks)
    return tasks


def build_split(rng, cfg, n, make, avoid: set, key, dedup: bool) -> tuple[list[dict], list[tuple[str, str]]]:
    """n conversations, make(task) -> (turns, asked facts) or None to redraw; a conversation whose key is in
    `avoid` (or, with dedup, repeats one of this split) is redrawn."""
    convs, asked, seen = [], [], set()
    n_system = round(n * cfg.system_frac)  # fixed per slot: redrawing it on a duplicate would bias dev
    systems = [rng.choice(SYSTEM_PROMPTS) for _ in range(n_system)] + [None] * (n - n_system)
    rng.shuffle(systems)
    for task, system in zip(task_list(rng, cfg, n), systems):
        for _ in range(1000):
            made = make(task)
            if made is None:
                continue
            conv = chat(system, made[0])
            k = key(conv)
            if k not in avoid and not (dedup and k in seen):
                break
        else:
            raise ValueError(f"could not draw {n} distinct conversations ({task}); enlarge the world or shrink n")
        convs.append(conv)
        seen.add(k)
        asked += made[1]
    return convs, asked


def user_key(conv: dict) -> str:
    return "\x00".join(m["content"] for m in conv["messages"] if m["role"] == "user")


def maker(rng, cfg, ents, syllables, held: list, heldout: bool):
    """make(task) for build_split: train/dev ask only non-held-out facts; heldout's fact and multi-turn
    conversations end on a held-out fact (cycling through all of them)."""
    held_set, taken = set(held), world_words(ents)
    facts = [(e, a) for e, ent in ents.items() for a in ATTRS[ent["kind"]] if (e, a) not in held_set]
    cycles = {t: itertools.cycle(rng.sample(held, len(held))) for t in ("fact", "multi")}

    def make(task):
        if task == "passage":
            return [passage_turn(rng, syllables, taken)], []
        if task == "arith":
            x = arith(rng, cfg.arith_max)
            return [(rng.choice(ARITH_ASK).format(**x), str(x["c"]))], []
        if task == "fact":
            steps = [next(cycles[task]) if heldout else rng.choice(facts)]
        elif heldout:  # multi: 1+ questions about the same entity, then a follow-up on its held-out fact
            fact = next(cycles[task])
            steps = walk(rng, ents, fact[0], rng.randint(1, cfg.max_turns - 1),
                         lambda f: f not in held_set and f[1] not in LINKS and f != fact) + [fact]
        else:
            steps = walk(rng, ents, rng.choice(facts)[0], rng.randint(2, cfg.max_turns), lambda f: f not in held_set)
        return (ask(rng, ents, steps), steps) if len(steps) >= (2 if task == "multi" else 1) else None
    return make


MC_LETTERS = "abcd"  # single tokens in the bundled tokenizer (capital A and C are not)
MC_ASK = ["{q}\n{options}\nAnswer with a, b, c or d.", "{q} Pick one option.\n{options}",
          "Choose the right answer.\n{q}\n{options}"]


def mc_question(rng: random.Random, ents: dict, fact: tuple[str, str]) -> dict:
    """A multiple-choice conversation about one world fact: the true value among up to three other values of
    the same attribute, options shuffled and labelled a) b) c) d); the gold answer is the letter."""
    name, attr = fact
    truth = ents[name][attr]
    others = sorted({e[attr] for e in ents.values() if attr in e} - {truth})
    options = rng.sample(others, min(len(MC_LETTERS) - 1, len(others))) + [truth]
    rng.shuffle(options)
    listed = "\n".join(f"{letter}) {o}" for letter, o in zip(MC_LETTERS, options))
    q = rng.choice(TEMPLATES[attr]["ask"]).format(e=name)
    return chat(None, [(rng.choice(MC_ASK).format(q=q, options=listed), MC_LETTERS[options.index(truth)])])


def mc_split(rng: random.Random, ents: dict, facts: list, n: int) -> list[dict]:
    """n multiple-choice conversations cycling through `facts` in a seeded order."""
    if n and not facts:
        raise ValueError("synth: no facts left for multiple-choice questions")
    order = rng.sample(facts, len(facts))
    return [mc_question(rng, ents, order[i % len(order)]) for i in range(n)]


SUITE_ARITH = {"plus": ["Add {a} and {b}.", "What do you get when you add {b} to {a}?",
                        "Work out the sum of {a} and {b}."],
               "minus": ["Take {b} away from {a}.", "Subtract {b} from {a}.",
                         "How much is left when {b} is taken from {a}?"]}


def world_suite(cfg: SynthConfig, rng: random.Random, ents: dict, held: list) -> list[dict]:
    """A general-ability suite of the world (docs/evaluation.md: Suites): multiple-choice questions about facts the
    corpus states but the chat data never asks about (choices: the true value and up to three other values of the
    attribute, gold: its index), then sums and differences asked in phrasings the chat data never uses (gold: the
    number). What fine-tuning should keep rather than teach."""
    facts = held or [(e, a) for e, ent in ents.items() for a in ATTRS[ent["kind"]]]
    order = rng.sample(facts, len(facts))
    rows = []
    for i in range(cfg.n_suite_mc):
        name, attr = order[i % len(order)]
        truth = ents[name][attr]
        others = sorted({e[attr] for e in ents.values() if attr in e} - {truth})
        choices = rng.sample(others, min(3, len(others))) + [truth]
        rng.shuffle(choices)
        rows.append({"question": rng.choice(TEMPLATES[attr]["ask"]).format(e=name), "choices": choices,
                     "answer": choices.index(truth)})
    for _ in range(cfg.n_suite_arith):
        x = arith(rng, cfg.arith_max)
        rows.append({"question": rng.choice(SUITE_ARITH[x["op"]]).format(**x), "answer": str(x["c"])})
    return rows


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def generate(cfg: SynthConfig, out_dir: str) -> dict:
    """Write corpus.jsonl, train/dev/heldout.jsonl and world.json into out_dir; return the counts."""
    stream = lambda part: random.Random(f"{cfg.seed}:{part}")  # noqa: E731  (one stream per part)
    ents, syllables = build_world(cfg, stream("world"))
    facts = [(e, a) for e, ent in ents.items() for a in ATTRS[ent["kind"]]]
    held = sorted(stream("heldout_facts").sample(facts, round(cfg.heldout_frac * len(facts))))
    corpus = build_corpus(cfg, stream("corpus"), ents, syllables)
    rng = stream("chat")
    train, asked_train = build_split(rng, cfg, cfg.n_train, maker(rng, cfg, ents, syllables, held, False),
                                     set(), json.dumps, dedup=False)
    dev, asked_dev = build_split(rng, cfg, cfg.n_dev, maker(rng, cfg, ents, syllables, held, False),
                                 {json.dumps(c) for c in train}, json.dumps, dedup=True)
    heldout, asked_heldout = build_split(rng, cfg, cfg.n_heldout, maker(rng, cfg, ents, syllables, held, True),
                                         {user_key(c) for c in train + dev}, user_key, dedup=True)
    # multiple choice: its own random stream, so the other files do not change with n_mc / n_mc_train; known
    # (not held-out) facts, split in two: mc.jsonl asks about one half, train.jsonl's MC rows about the other
    mc_rng = stream("mc")
    known = [f for f in facts if f not in set(held)]
    mc_rng.shuffle(known)
    half = len(known) // 2 if cfg.n_mc_train else len(known)
    mc = mc_split(mc_rng, ents, known[:half], cfg.n_mc)
    train += mc_split(mc_rng, ents, known[half:], cfg.n_mc_train)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("corpus", [{"text": d} for d in corpus]), ("train", train), ("dev", dev), ("heldout", heldout),
                       ("mc", mc)):
        write_jsonl(out / f"{name}.jsonl", rows)
    suite = world_suite(cfg, stream("suite"), ents, held)  # its own stream: the other files stay as they were
    (out / "suites").mkdir(exist_ok=True)
    write_jsonl(out / "suites" / "world.jsonl", suite)
    asked = {"train": asked_train, "dev": asked_dev, "heldout": asked_heldout}
    world = {"config": asdict(cfg), "entities": ents, "heldout_facts": [list(f) for f in held],
             "asked": {k: sorted(set(v)) for k, v in asked.items()}}
    (out / "world.json").write_text(json.dumps(world, indent=1) + "\n")
    return {"corpus_docs": len(corpus), "corpus_chars": sum(map(len, corpus)), "train": len(train),
            "dev": len(dev), "heldout": len(heldout), "mc": len(mc), "facts": len(facts), "heldout_facts": len(held),
            "suite": len(suite)}
