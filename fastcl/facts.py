"""Seeded streams of new facts about fictional entities, for the benchmark and the demo.

Two domains (DOMAINS): "companies", the one every recipe was developed and reported on, and
"people", written afterwards and kept out of development: its names, values, documents and
question phrasings share nothing with the companies', so a recipe tuned to the companies can be
checked on data it was never tuned to (`bench/continual.py --domain people`).

Each entity has four attributes. A document states them; a served question asks one of them
in a *served* phrasing; evaluation asks the same fact in *held-out* phrasings that are never
served, with four distractors drawn from the same attribute's pool.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

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

DOCUMENTS = [
    "{entity} is a company headquartered in {city}. It was founded in {year} by {founder}. "
    "Today {entity} is best known for making {product}.",
    "Founded by {founder} in {year}, {entity} has its headquarters in {city}. "
    "The company's main product is {product}.",
    "{entity} makes {product}. The firm was started in {year} by {founder} and is based in {city}.",
]

# What users ask while the document is in context. Never used for evaluation.
SERVED_QUESTIONS = {
    "founder": ["Who founded {entity}?", "Who started {entity}?"],
    "city": ["Where is {entity} headquartered?", "In which city is {entity} based?"],
    "product": ["What does {entity} make?", "What is {entity}'s main product?"],
    "year": ["When was {entity} founded?", "In what year was {entity} started?"],
}

# Held-out phrasings, used only to evaluate. Disjoint from the served ones (a test checks).
EVAL_QUESTIONS = {
    "founder": ["Name the person who established {entity}.", "{entity} owes its existence to which entrepreneur?"],
    "city": ["Name the city where {entity} has its head office.", "{entity}'s headquarters can be found in what city?"],
    "product": ["Name the goods that {entity} is famous for producing.", "If you buy from {entity}, what do you get?"],
    "year": ["Name the year {entity} came into being.", "{entity} has existed since which year?"],
}

# The held-out domain (written in the sixteenth session, after every recipe decision; never used
# to choose one). Names, values and phrasings are disjoint from the companies' (a test checks);
# every profession starts with a consonant, so the documents' "a {profession}" reads right.
PERSON_FIRST = ["Anneliese", "Bartholomew", "Clementine", "Desmond", "Eulalia", "Florian", "Griselda", "Horatio",
                "Imogen", "Jasper", "Katarina", "Leopold", "Mirabel", "Nikolai", "Ophelia", "Percival", "Rosalind",
                "Sebastian", "Theodora", "Ulrich", "Valentina", "Wilhelmina", "Xavier", "Yolanda", "Zacharias",
                "Annika", "Benedikt", "Cordelia", "Dmitri", "Esmeralda"]
PERSON_LAST = ["Aldridge", "Barrowby", "Coldwell", "Dunstable", "Ellery", "Frobisher", "Grantham", "Holloway",
               "Jardine", "Kilbride", "Larkspur", "Marchetti", "Nettleton", "Orpington", "Pennington", "Radcliffe",
               "Stanhope", "Treadwell", "Upcott", "Varley", "Wetherby", "Ackroyd", "Birkett", "Crosland",
               "Dewhurst", "Elphick", "Fothergill", "Gledhill", "Heseltine", "Illingworth"]
HOMETOWNS = ["Salzburg", "Nagoya", "Seville", "Aberdeen", "Krakow", "Uppsala", "Lille", "Trieste", "Quebec",
             "Hobart", "Odense", "Leiden", "Galway", "Innsbruck", "Coimbra", "Bremen", "Turku", "Verona", "Sapporo",
             "Savannah", "Dunedin", "Plovdiv", "Riga", "Bruges", "Zaragoza", "Kaunas", "Stavanger", "Basel",
             "Rennes", "Ljubljana"]
PROFESSIONS = ["glassblower", "cartographer", "beekeeper", "locksmith", "stonemason", "puppeteer", "tax auditor",
               "marine biologist", "florist", "blacksmith", "sommelier", "pilot", "watchmaker", "zookeeper",
               "dentist", "librarian", "firefighter", "pastry chef", "bookbinder", "translator",
               "lighthouse keeper", "tailor", "geologist", "veterinarian", "carpenter", "pharmacist", "radio host",
               "barber", "surveyor", "perfumer"]
INSTRUMENTS = ["cello", "oboe", "banjo", "harp", "bassoon", "accordion", "ukulele", "trombone", "clarinet",
               "mandolin", "viola", "harmonica", "xylophone", "sitar", "bagpipes", "tuba", "flute", "saxophone",
               "double bass", "harpsichord", "marimba", "French horn", "piccolo", "zither", "trumpet", "bongos",
               "lute", "didgeridoo", "glockenspiel", "piano"]

PERSON_DOCUMENTS = [
    "{entity} was born in {hometown} in {birth_year}. {entity} works as a {profession} and, outside work, "
    "plays the {instrument}.",
    "A {profession} by trade, {entity} grew up in {hometown}, having been born there in {birth_year}. "
    "In the evenings {entity} plays the {instrument}.",
    "{entity} plays the {instrument} in a local orchestra. Born in {birth_year} in {hometown}, {entity} now "
    "earns a living as a {profession}.",
]
PERSON_SERVED_QUESTIONS = {
    "hometown": ["Where was {entity} born?", "Which town is {entity} from?"],
    "profession": ["What does {entity} do for a living?", "What is {entity}'s job?"],
    "instrument": ["Which instrument does {entity} play?", "What instrument is {entity} known to play?"],
    "birth_year": ["When was {entity} born?", "In what year was {entity} born?"],
}
PERSON_EVAL_QUESTIONS = {
    "hometown": ["Name the town where {entity} came into the world.", "{entity} is a native of which place?"],
    "profession": ["Name {entity}'s occupation.", "{entity} earns money working as what?"],
    "instrument": ["Name the musical instrument that {entity} plays.",
                   "At a concert, {entity} would be holding which instrument?"],
    "birth_year": ["Name the year of {entity}'s birth.", "What year appears as {entity}'s year of birth?"],
}


@dataclass(frozen=True)
class Domain:
    """A kind of fictional entity: how its names are drawn, each attribute's pool of values (in
    the order the attributes are asked), the documents stating them, and the served and held-out
    question phrasings (both keyed by attribute, with {entity} for the name)."""

    draw_name: Callable[[random.Random], str]
    pools: dict[str, list[str]]
    documents: list[str]
    served_questions: dict[str, list[str]]
    eval_questions: dict[str, list[str]]

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(self.pools)


def _company_name(rng: random.Random) -> str:
    return f"{rng.choice(PREFIX)}{rng.choice(SUFFIX)} {rng.choice(KIND)}"


def _person_name(rng: random.Random) -> str:
    return f"{rng.choice(PERSON_FIRST)} {rng.choice(PERSON_LAST)}"


DOMAINS = {
    "companies": Domain(
        _company_name,
        {"founder": [f"{a} {b}" for a in FIRST for b in LAST], "city": CITIES, "product": PRODUCTS,
         "year": [str(y) for y in range(1950, 2020)]},
        DOCUMENTS, SERVED_QUESTIONS, EVAL_QUESTIONS),
    "people": Domain(
        _person_name,
        {"hometown": HOMETOWNS, "profession": PROFESSIONS, "instrument": INSTRUMENTS,
         "birth_year": [str(y) for y in range(1940, 2000)]},
        PERSON_DOCUMENTS, PERSON_SERVED_QUESTIONS, PERSON_EVAL_QUESTIONS),
}


@dataclass(frozen=True)
class Fact:
    entity: str  # the company or person the fact is about
    attribute: str
    value: str
    document: str
    served_question: str
    eval_questions: tuple[str, ...]
    options: tuple[str, ...]  # the value and four distractors, shuffled
    answer_index: int


def _entity_names(rng: random.Random, n: int, draw_name: Callable[[random.Random], str]) -> list[str]:
    names: list[str] = []  # a list, not a set: set order changes with the process's hash seed
    while len(names) < n:
        name = draw_name(rng)
        if name not in names:
            names.append(name)
    return names


def fact_stream(n_entities: int = 20, seed: int = 0, n_options: int = 5, domain: str = "companies") -> list[Fact]:
    """n_entities x 4 facts of `domain` (a key of DOMAINS), in serving order (entities in turn,
    attributes in turn)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown fact domain {domain!r}; choose one of {sorted(DOMAINS)}")
    spec = DOMAINS[domain]
    rng = random.Random(seed)
    entities = []
    for name in _entity_names(rng, n_entities, spec.draw_name):
        values = {attr: rng.choice(pool) for attr, pool in spec.pools.items()}
        entities.append((name, values, rng.choice(spec.documents).format(entity=name, **values)))
    facts = []
    for name, values, document in entities:
        for attribute in spec.attributes:
            value = values[attribute]
            distractors = rng.sample([v for v in spec.pools[attribute] if v != value], n_options - 1)
            options = distractors + [value]
            rng.shuffle(options)
            facts.append(Fact(
                entity=name,
                attribute=attribute,
                value=value,
                document=document,
                served_question=rng.choice(spec.served_questions[attribute]).format(entity=name),
                eval_questions=tuple(q.format(entity=name) for q in spec.eval_questions[attribute]),
                options=tuple(options),
                answer_index=options.index(value),
            ))
    return facts
