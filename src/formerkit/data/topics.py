"""A synthetic sentence-classification task that rewards knowing what words mean: ``synthetic:topics``.

Each sentence mentions one thing (a sport, a dish, a kind of weather, a musical instrument or
form) inside a neutral frame ("We talked about {thing} for hours."); its label is the topic.
The held-out sentences mention things that never occur in training, so a model trained from
scratch can only guess on them, while a pretrained encoder (all-MiniLM-L6-v2) knows that
"badminton" is a sport even though it only saw "tennis". Deterministic for a given seed.
"""

from __future__ import annotations

import random

from formerkit.data.labeled import LabeledData

TOPICS = {
    "sports": ["football", "tennis", "basketball", "soccer", "baseball", "golf", "hockey", "rugby", "cricket",
               "volleyball", "swimming", "boxing", "cycling", "the marathon", "skiing", "wrestling", "badminton",
               "athletics", "surfing", "archery", "the referee", "the goalkeeper", "the stadium", "the championship"],
    "food": ["pizza", "pasta", "the sandwich", "the salad", "soup", "bread", "cheese", "chocolate", "pancakes",
             "sushi", "noodles", "curry", "the burger", "the omelette", "steak", "dumplings", "cookies", "yogurt",
             "waffles", "tacos", "the recipe", "the oven", "dessert", "the kitchen"],
    "weather": ["the rain", "snow", "the thunderstorm", "fog", "hail", "sunshine", "the forecast", "humidity",
                "drizzle", "the heatwave", "the wind", "the blizzard", "frost", "the clouds", "the hurricane",
                "the tornado", "the temperature", "sleet", "the drought", "the monsoon", "lightning", "the breeze",
                "the typhoon", "the rainbow"],
    "music": ["the guitar", "the piano", "the violin", "the drums", "the concert", "the orchestra", "jazz",
              "the melody", "the saxophone", "the symphony", "the choir", "the album", "the trumpet", "the cello",
              "the song", "the band", "the lyrics", "the flute", "the opera", "the rhythm", "the harmony", "the chord",
              "the playlist", "the singer"],
}
FRAMES = ["We talked about {} for hours.", "My neighbour keeps mentioning {}.",
          "There was an article about {} in the paper.", "She asked me what I think of {}.",
          "Nobody expected {} to come up at dinner.", "He wrote a long letter about {}.",
          "The radio show today was all about {}.", "I can't stop thinking about {}.",
          "They argued about {} again.", "Grandma told a story about {}."]
NAME = "synthetic:topics"


def topic_splits(val_fraction: float = 0.25, seed: int = 0) -> tuple[LabeledData, LabeledData]:
    """(train, held-out) sentences; the held-out ones mention ``val_fraction`` of each topic's things.

    Those things never occur in the training sentences. Every (thing, frame) pair occurs once:
    4 topics x 24 things x 10 frames = 960 sentences.
    """
    rng = random.Random(seed)
    names = sorted(TOPICS)
    train: list[tuple[str, int]] = []
    held_out: list[tuple[str, int]] = []
    for label, topic in enumerate(names):
        things = list(TOPICS[topic])
        rng.shuffle(things)
        n_val = max(1, round(len(things) * val_fraction))
        for i, thing in enumerate(things):
            rows = held_out if i < n_val else train
            rows += [(frame.format(thing), label) for frame in FRAMES]
    rng.shuffle(train)
    rng.shuffle(held_out)
    return (LabeledData([t for t, _ in train], [y for _, y in train], names),
            LabeledData([t for t, _ in held_out], [y for _, y in held_out], names))
