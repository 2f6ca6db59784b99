"""The embedded default data: a "general" corpus (the old capabilities to keep) and a "domain"
corpus (finance reports, the new skill), both generated from templates so nothing is downloaded,
and finance preference pairs. Read with the byte-level tokenizer (train/data.py: ByteTokenizer).

General text plays the part of a pretrained model's knowledge; the retain set is held-out general
text. A fine-tune that forgets shows it as a rising retain loss.
"""

from __future__ import annotations

import random

GENERAL = [
    "The {animal} sat by the {place} and watched the {weather} sky.",
    "In the morning we walked to the {place} and bought {food} for the {animal}.",
    "My {relative} likes to cook {food} when the weather is {weather}.",
    "After the rain, the children ran to the {place} to look for the {animal}.",
    "She read a book about the {animal} while her {relative} made {food}.",
    "It was a {weather} day, so the {relative} stayed near the {place}.",
]
DOMAIN = [
    "Quarterly revenue at {company} rose {pct}% to ${amount} million, driven by {driver}.",
    "{company} cut its full-year guidance after {driver} weighed on margins by {pct}%.",
    "Net income of {company} reached ${amount} million as {driver} lifted earnings per share.",
    "Analysts expect {company} to report operating margin of {pct}% on ${amount} million of sales.",
    "The board of {company} approved a ${amount} million buyback after {driver} boosted cash flow.",
]
SLOTS = {
    "animal": ["cat", "dog", "horse", "owl", "fox", "rabbit", "goat"],
    "place": ["river", "market", "garden", "station", "library", "hill"],
    "weather": ["grey", "bright", "windy", "cold", "warm", "cloudy"],
    "food": ["bread", "soup", "apples", "rice", "cheese", "pie"],
    "relative": ["aunt", "uncle", "sister", "brother", "grandmother", "cousin"],
    "company": ["Northwind", "Acme Corp", "Globex", "Initech", "Umbrella Ltd", "Stark Industries"],
    "driver": ["strong cloud demand", "higher interest income", "weak consumer spending",
               "rising input costs", "a one-off tax gain", "currency headwinds"],
}


# Two more domains for the strategies that train one adapter per domain (domains.py), with slots of
# their own (SLOTS stays as it is: the default's text, and so its numbers, do not change).
MEDICAL = [
    "Patients with {condition} received {drug} at {dose} mg, and {pct}% reported fewer symptoms.",
    "The trial of {drug} for {condition} enrolled {amount} adults over {weeks} weeks.",
    "Doctors prescribe {drug} for {condition} when first-line treatment fails after {weeks} weeks.",
    "A dose of {dose} mg of {drug} lowered the risk of {condition} by {pct}% in {amount} patients.",
    "Side effects of {drug} appeared in {pct}% of patients treated for {condition}.",
]
LEGAL = [
    "The {court} ruled that the {party} breached the contract under section {section}.",
    "Under section {section}, the {party} must give {weeks} weeks of notice before ending the lease.",
    "The {court} awarded the {party} damages of ${amount} thousand for the delay.",
    "An appeal to the {court} must be filed within {weeks} weeks of the judgment.",
    "The {party} argued that section {section} did not apply to the agreement.",
]
DOMAIN_SLOTS = {
    "condition": ["asthma", "migraine", "diabetes", "hypertension", "insomnia", "arthritis"],
    "drug": ["lumavir", "cardiolex", "neuroprin", "glycotab", "respiran", "dolorex"],
    "court": ["High Court", "Court of Appeal", "district court", "Supreme Court", "tribunal"],
    "party": ["tenant", "landlord", "employer", "supplier", "buyer", "contractor"],
}
DOMAINS = {"finance": (DOMAIN, SLOTS), "medical": (MEDICAL, DOMAIN_SLOTS), "legal": (LEGAL, DOMAIN_SLOTS)}


def generate(templates: list[str], n_sentences: int, seed: int, slots: dict = SLOTS) -> str:
    """`n_sentences` sentences, each a random template with random slot values."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        values = {k: rng.choice(v) for k, v in slots.items()}
        values["pct"] = str(rng.randint(2, 39))
        values["amount"] = str(rng.randint(12, 990))
        if slots is not SLOTS:  # the default's draws stay exactly as they were
            values.update(dose=str(rng.randint(5, 500)), weeks=str(rng.randint(2, 52)), section=str(rng.randint(1, 99)))
        out.append(rng.choice(templates).format(**values))
    return " ".join(out)


# Preference pairs in the finance domain: the preferred answer states the figures, the rejected one
# hedges. Short enough for 64-byte windows (prompt ≤ 27 bytes, answer ≤ 33).
PREFERENCE_PROMPTS = ["{company} results?\n", "{company} quarter?\n", "{company} update?\n"]
PREFERRED = ["Revenue +{pct}% to ${amount}M.", "Net income ${amount}M, up {pct}%.", "Margin {pct}% on ${amount}M sales.",
             "EPS up {pct}%; sales ${amount}M."]
HEDGING = ["Hard to say, it depends.", "Results were fine, I think.", "Things went okay overall.",
           "Nobody really knows.", "Could be better or worse."]


def preference_pairs(n_pairs: int, seed: int) -> list[dict[str, str]]:
    """`n_pairs` {"prompt", "chosen", "rejected"} records: a question about a company, an answer with
    its figures (chosen) and a vague one (rejected)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_pairs):
        values = {"company": rng.choice(SLOTS["company"]), "pct": str(rng.randint(2, 39)),
                  "amount": str(rng.randint(12, 990))}
        out.append({"prompt": rng.choice(PREFERENCE_PROMPTS).format(**values),
                    "chosen": rng.choice(PREFERRED).format(**values), "rejected": rng.choice(HEDGING)})
    return out
