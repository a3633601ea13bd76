"""Deterministic benchmark conversations: a realistic length mix in Qwen's `conversations` format.

    python bench/make_data.py            # -> bench/.cache/bench_data.json (2,000 conversations, seed 0)
    python bench/make_data.py --n 500 --seed 1 --out /tmp/x.json

What it generates (all from a seeded `random.Random`, no download, same bytes on every machine):

* Total ChatML length (system block + every turn, as the model sees it) drawn log-normally:
  median ~300 tokens, sigma 0.85, clipped to [40, 2048] -> ~8 % of conversations over 1,000
  tokens and a few at the 2,048 cap, so at model_max_length=2048 nothing is truncated.
* 55 % single-turn, 45 % multi-turn (2-5 user/assistant exchanges); assistants get most of the
  budget, as in real SFT data.
* Mixed languages: English prose (50 %), Chinese (25 %), English + code blocks (12 %), and
  Japanese / Russian / French / German / Spanish with emoji (13 %).
* Every record uses the default system prompt (the reference finetune.py has no per-sample system).

Token budgets are met with the real Qwen tokenizer (sentence by sentence), and the script checks
the result with qwen-tune's ChatMLEncoder and prints the length distribution.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / ".cache" / "bench_data.json"
MAX_TOKENS = 2048
MEDIAN_TOKENS = 300
SIGMA = 0.85
MIN_TOKENS = 40

EN = """the of and to in is that it for as with was on be by at this from or have an they which one you
had not but what all were when we there can your use each she do how their if will up other about out
many then them these so some her would make like him into time has two more write go see number no way
could people my than first water been call who its now find long down day did get come made may part
model data training loss token memory speed batch sequence layer weight gradient learning rate value
system user answer question example result function method simple small large fast slow because while
before after during between under over again further once here where why both few most such only own
same very just should now explain describe compare summarize consider important different possible
however therefore also often usually sometimes probably clearly quickly carefully exactly especially
city river mountain history science music language computer network server file program project team
report market price customer product service health school student teacher book story idea problem
solution step reason effect cause change growth energy light sound world country government company""".split()

ZH = """我们 你们 他们 这个 那个 什么 为什么 怎么 可以 需要 应该 已经 没有 因为 所以 但是 如果 虽然 然后
模型 数据 训练 损失 内存 速度 批次 序列 参数 梯度 学习 问题 答案 方法 结果 例子 系统 用户 助手 语言
中国 北京 上海 城市 历史 文化 科学 技术 经济 社会 发展 重要 简单 复杂 快速 缓慢 时间 工作 学生 老师
今天 明天 昨天 朋友 家庭 公司 市场 产品 服务 健康 学校 书籍 故事 想法 解决 步骤 原因 影响 变化 能源
请 帮 我 你 他 她 的 了 是 在 有 和 就 都 也 很 还 会 说 看 做 想 用 给 让 被 把 对 从 到 比 更 最""".split()
ZH_PUNCT = ["，", "，", "、", "；"]
ZH_END = ["。", "。", "。", "？", "！"]

OTHER = {
    "ja": ("私 あなた 彼 これ それ 日本 東京 言語 モデル 学習 データ 時間 問題 答え 方法 結果 とても 少し "
           "大きい 小さい 速い 遅い 新しい 古い 食べる 行く 見る 書く 読む する ある いる です ます でした", "", "。"),
    "ru": ("я ты он она мы они это что как почему где когда модель данные обучение память скорость "
           "вопрос ответ пример результат город история язык книга время работа очень быстро медленно", " ", "."),
    "fr": ("je tu il elle nous vous ils le la les un une des est sont avec pour dans sur modèle données "
           "apprentissage mémoire vitesse question réponse exemple résultat ville histoire très bien", " ", "."),
    "de": ("ich du er sie wir ihr das der die ein eine ist sind mit für in auf Modell Daten Training "
           "Speicher Geschwindigkeit Frage Antwort Beispiel Ergebnis Stadt Geschichte sehr gut schnell", " ", "."),
    "es": ("yo tú él ella nosotros ellos el la los las un una es son con para en sobre modelo datos "
           "entrenamiento memoria velocidad pregunta respuesta ejemplo resultado ciudad historia muy bien", " ", "."),
}
EMOJI = ["😀", "😊", "🚀", "🔥", "👍", "🎉", "🤔", "✅", "📈", "🌍"]

IDENT = "data batch model tokens loss step config result items value index count total buffer cache path".split()
PY_FUNCS = "load parse encode compute update merge filter build train evaluate collate pack".split()


def _en_sentence(r: random.Random) -> str:
    words = [r.choice(EN) for _ in range(r.randint(6, 20))]
    if r.random() < 0.3:
        words.insert(r.randint(1, len(words) - 1), str(r.randint(2, 4096)))
    if len(words) > 8 and r.random() < 0.4:
        words[r.randint(2, len(words) - 3)] += ","
    s = " ".join(words)
    return s[0].upper() + s[1:] + r.choice([".", ".", ".", "?", "!"])


def _zh_sentence(r: random.Random) -> str:
    out = []
    for i in range(r.randint(5, 16)):
        out.append(r.choice(ZH))
        if i > 2 and r.random() < 0.15:
            out.append(r.choice(ZH_PUNCT))
    if r.random() < 0.2:
        out.insert(r.randint(0, len(out)), str(r.randint(1, 2024)))
    return "".join(out) + r.choice(ZH_END)


def _other_sentence(r: random.Random, lang: str) -> str:
    vocab, sep, end = OTHER[lang]
    words = vocab.split()
    s = sep.join(r.choice(words) for _ in range(r.randint(5, 14)))
    if sep:
        s = s[0].upper() + s[1:]
    if r.random() < 0.35:
        s += " " + r.choice(EMOJI)
    return s + end


def _code_block(r: random.Random) -> str:
    name = f"{r.choice(PY_FUNCS)}_{r.choice(IDENT)}"
    a, b = r.sample(IDENT, 2)
    lines = [f"def {name}({a}, {b}={r.randint(1, 512)}):", f'    """{_en_sentence(r)}"""']
    for _ in range(r.randint(2, 8)):
        v, w = r.sample(IDENT, 2)
        lines.append(r.choice([
            f"    {v} = [{w}[i] * {r.randint(2, 9)} for i in range(len({w}))]",
            f"    if {v} > {r.randint(0, 100)}:\n        return {w}",
            f"    for {v} in {w}:\n        {a}.append({v} + {r.randint(1, 9)})",
            f"    {v} = {{k: {w}.get(k, 0) for k in {a}}}",
            f"    print(f\"{v}={{{v}}}\")  # {r.choice(EN)}",
        ]))
    lines.append(f"    return {r.choice(IDENT)}")
    return "```python\n" + "\n".join(lines) + "\n```"


def _piece(r: random.Random, lang: str) -> str:
    if lang == "en":
        return _en_sentence(r)
    if lang == "zh":
        return _zh_sentence(r)
    if lang == "code":
        return _code_block(r) if r.random() < 0.3 else _en_sentence(r)
    s = _other_sentence(r, lang)
    return s


def _text(r: random.Random, lang: str, budget: int, count) -> str:
    """Text of about `budget` tokens (never below 3): sentences, paragraphs, sometimes a list."""
    budget = max(3, budget)
    parts: list[str] = []
    used = 0
    while used < budget:
        p = _piece(r, lang)
        if parts:
            sep = "\n\n" if r.random() < 0.2 else ("\n- " if lang == "en" and r.random() < 0.05 else
                                                  ("" if lang in ("zh", "ja") else " "))
            p = sep + p
        n = count(p)
        if used + n > budget and parts:
            # Trim the last sentence to the remaining budget (by characters, then re-count).
            room = budget - used
            if room <= 2:
                break
            p = p[: max(1, int(len(p) * room / n))]
            n = count(p)
            if used + n > budget + 2:
                break
        parts.append(p)
        used += n
    return "".join(parts).strip() or "ok"


def _split(r: random.Random, total: int, k: int) -> list[int]:
    w = [r.expovariate(1.0) + 0.3 for _ in range(k)]
    s = sum(w)
    return [max(1, int(total * x / s)) for x in w]


def generate(n: int, seed: int, tokenizer) -> list[dict]:
    from qwen_tune.data.tokenizer import encode_texts

    def count(text: str) -> int:
        return len(encode_texts(tokenizer, [text])[0])

    r = random.Random(seed)
    langs = ["en"] * 50 + ["zh"] * 25 + ["code"] * 12 + ["ja", "ru", "fr", "de", "es"] * 2 + ["ja", "zh", "en"]
    records = []
    system_overhead = 11  # <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n
    for i in range(n):
        total = int(round(math.exp(r.gauss(math.log(MEDIAN_TOKENS), SIGMA))))
        total = min(MAX_TOKENS, max(MIN_TOKENS, total))
        lang = r.choice(langs)
        exchanges = 1 if r.random() < 0.55 else r.randint(2, 5)
        text_budget = max(8 * exchanges, total - system_overhead - 5 * 2 * exchanges)
        conv = []
        for budget in _split(r, text_budget, exchanges):
            user_share = r.uniform(0.08, 0.4)
            ub = max(3, int(budget * user_share))
            conv.append({"from": "user", "value": _text(r, lang, ub, count)})
            conv.append({"from": "assistant", "value": _text(r, lang, budget - ub, count)})
        # Budgets are met sentence by sentence with a little slack: cut the last answer if over the cap.
        length = system_overhead + sum(count(t["value"]) + 5 for t in conv)
        while length > MAX_TOKENS:
            last = conv[-1]["value"]
            conv[-1]["value"] = last[: int(len(last) * 0.97)]
            length = system_overhead + sum(count(t["value"]) + 5 for t in conv)
        records.append({"id": f"bench-{i:05d}", "lang": lang, "conversations": conv})
    return records


def length_stats(lengths: list[int]) -> dict:
    s = sorted(lengths)
    q = lambda p: s[min(len(s) - 1, int(p * len(s)))]  # noqa: E731
    return {"n": len(s), "total_tokens": sum(s), "mean": round(statistics.mean(s), 1), "median": statistics.median(s),
            "p10": q(0.10), "p90": q(0.90), "p99": q(0.99), "max": s[-1], "min": s[0],
            "over_1024": sum(x > 1024 for x in s), "over_2048": sum(x > 2048 for x in s)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    from qwen_tune.data.formats import RawRecord, to_conversation
    from qwen_tune.data.template import ChatMLEncoder
    from qwen_tune.data.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    records = generate(args.n, args.seed, tok)
    convs = [to_conversation(RawRecord(str(args.out), i, rec), "qwen") for i, rec in enumerate(records)]
    samples = ChatMLEncoder(tok, 1 << 30).encode(convs)
    lengths = [len(s.input_ids) for s in samples]
    data = json.dumps(records, ensure_ascii=False, indent=0).encode("utf-8")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    st = length_stats(lengths)
    langs: dict[str, int] = {}
    for rec in records:
        langs[rec["lang"]] = langs.get(rec["lang"], 0) + 1
    multi = sum(len(rec["conversations"]) > 2 for rec in records)
    print(f"wrote {args.out} ({len(data) / 1e6:.1f} MB, sha256 {hashlib.sha256(data).hexdigest()[:16]})")
    print(f"conversations: {st['n']}  single-turn: {st['n'] - multi}  multi-turn: {multi}")
    print("languages: " + ", ".join(f"{k} {v}" for k, v in sorted(langs.items(), key=lambda kv: -kv[1])))
    print("ChatML tokens: " + ", ".join(f"{k} {v}" for k, v in st.items() if k != "n"))
    return 0


def load_bench_data(path: Path = DEFAULT_OUT, n: int = 2000, seed: int = 0) -> list[dict]:
    """The benchmark records, generated on first use (default path only)."""
    if not path.exists():
        if path != DEFAULT_OUT:
            raise FileNotFoundError(f"{path}: run bench/make_data.py --out {path} first")
        main(["--n", str(n), "--seed", str(seed)])
    return json.loads(path.read_text(encoding="utf-8"))


if __name__ == "__main__":
    sys.exit(main())
