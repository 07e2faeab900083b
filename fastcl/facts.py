"""A seeded stream of new facts about fictional companies, for the benchmark and the demo.

Each company has four attributes. A document states them; a served question asks one of them
in a *served* phrasing; evaluation asks the same fact in *held-out* phrasings that are never
served, with four distractors drawn from the same attribute's pool.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FIRST = ["Mara", "Tobin", "Elspeth", "Corvin", "Ilse", "Rafferty", "Sunniva", "Dario", "Wren", "Ottoline",
         "Beatrix", "Cassius", "Liora", "Anselm", "Marit", "Evander", "Petra", "Lucan", "Isolde", "Fenwick",
         "Greta", "Hollis", "Jorun", "Kasimir", "Linnea", "Magnus", "Noemi", "Osric", "Perrin", "Quenby"]
LAST = ["Quell", "Hartvig", "Ondrak", "Velloway", "Brannock", "Castellane", "Drummel", "Eskeland", "Fairweather",
        "Galloway", "Hesketh", "Ingleby", "Jessup", "Kettering", "Lockhart", "Merriweather", "Norrell", "Oakhurst",
        "Pendleton", "Quarrington", "Rathbone", "Sallow", "Thackeray", "Underhill", "Vantongeren", "Whitlock",
        "Yardley", "Zelenka", "Ashdown", "Blackwood"]
PREFIX = ["Vorn", "Zel", "Quar", "Brix", "Tal", "Orin", "Kest", "Mav", "Sol", "Drav", "Pell", "Ulm", "Yar", "Fen",
          "Cairn", "Lum", "Nex", "Ost", "Rhen", "Syl", "Thal", "Wex", "Ixa", "Jor", "Hal"]
SUFFIX = ["tex", "ara", "ion", "ova", "ix", "era", "ant", "ux", "ora", "ell"]
KIND = ["Labs", "Industries", "Systems", "Works", "Group", "Dynamics", "Holdings", "Collective"]
CITIES = ["Lyon", "Porto", "Osaka", "Leeds", "Tampere", "Graz", "Bilbao", "Adelaide", "Winnipeg", "Gdansk",
          "Bergen", "Utrecht", "Valencia", "Dresden", "Kyoto", "Halifax", "Tartu", "Brno", "Malmo", "Cork",
          "Lucerne", "Ghent", "Bologna", "Aarhus", "Tucson", "Busan", "Cusco", "Tromso", "Nantes", "Perth"]
PRODUCTS = ["solar panels", "electric bicycles", "frozen pizza", "hiking boots", "violin strings", "garden hoses",
            "typewriters", "kayaks", "hearing aids", "wooden toys", "espresso machines", "wind turbines",
            "chess clocks", "snow tires", "telescopes", "canned sardines", "wool blankets", "sewing machines",
            "fountain pens", "drone cameras", "ceramic tiles", "beekeeping suits", "weather balloons",
            "pipe organs", "rowing machines", "paper lanterns", "fishing nets", "sunglasses", "pocket watches",
            "soap bars"]

ATTRIBUTES = ("founder", "city", "product", "year")

DOCUMENTS = [
    "{company} is a company headquartered in {city}. It was founded in {year} by {founder}. "
    "Today {company} is best known for making {product}.",
    "Founded by {founder} in {year}, {company} has its headquarters in {city}. "
    "The company's main product is {product}.",
    "{company} makes {product}. The firm was started in {year} by {founder} and is based in {city}.",
]

# What users ask while the document is in context. Never used for evaluation.
SERVED_QUESTIONS = {
    "founder": ["Who founded {company}?", "Who started {company}?"],
    "city": ["Where is {company} headquartered?", "In which city is {company} based?"],
    "product": ["What does {company} make?", "What is {company}'s main product?"],
    "year": ["When was {company} founded?", "In what year was {company} started?"],
}

# Held-out phrasings, used only to evaluate. Disjoint from the served ones (a test checks).
EVAL_QUESTIONS = {
    "founder": ["Name the person who established {company}.", "{company} owes its existence to which entrepreneur?"],
    "city": ["Name the city where {company} has its head office.", "{company}'s headquarters can be found in what city?"],
    "product": ["Name the goods that {company} is famous for producing.", "If you buy from {company}, what do you get?"],
    "year": ["Name the year {company} came into being.", "{company} has existed since which year?"],
}


@dataclass(frozen=True)
class Fact:
    company: str
    attribute: str
    value: str
    document: str
    served_question: str
    eval_questions: tuple[str, ...]
    options: tuple[str, ...]  # the value and four distractors, shuffled
    answer_index: int


def _company_names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []  # a list, not a set: set order changes with the process's hash seed
    while len(names) < n:
        name = f"{rng.choice(PREFIX)}{rng.choice(SUFFIX)} {rng.choice(KIND)}"
        if name not in names:
            names.append(name)
    return names


def fact_stream(n_companies: int = 20, seed: int = 0, n_options: int = 5) -> list[Fact]:
    """n_companies x 4 facts, in serving order (companies in turn, attributes in turn)."""
    rng = random.Random(seed)
    pools = {
        "founder": [f"{a} {b}" for a in FIRST for b in LAST],
        "city": CITIES,
        "product": PRODUCTS,
        "year": [str(y) for y in range(1950, 2020)],
    }
    companies = []
    for name in _company_names(rng, n_companies):
        values = {attr: rng.choice(pool) for attr, pool in pools.items()}
        companies.append((name, values, rng.choice(DOCUMENTS).format(company=name, **values)))
    facts = []
    for name, values, document in companies:
        for attribute in ATTRIBUTES:
            value = values[attribute]
            distractors = rng.sample([v for v in pools[attribute] if v != value], n_options - 1)
            options = distractors + [value]
            rng.shuffle(options)
            facts.append(Fact(
                company=name,
                attribute=attribute,
                value=value,
                document=document,
                served_question=rng.choice(SERVED_QUESTIONS[attribute]).format(company=name),
                eval_questions=tuple(q.format(company=name) for q in EVAL_QUESTIONS[attribute]),
                options=tuple(options),
                answer_index=options.index(value),
            ))
    return facts
