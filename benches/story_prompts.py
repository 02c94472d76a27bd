"""Story requests shared by the serving benchmarks (benches/serving.py, benches/batch_priority.py):
prompts whose answers run long enough to fill a `max_tokens` of a few hundred, as
`vvlm-engine-bench batch`'s STORY_PROMPTS do for the engine alone."""

STORY_PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Write a long story about a dragon who learns to cook.",
    "Tell me a long tale about a lost city under the sea.",
    "Write a long story about two friends crossing a desert.",
    "Describe, at length, a day in the life of a medieval baker.",
    "Write a long story about a robot who paints.",
    "Tell a long story about a storm over a small fishing village.",
    "Write a long story about a clockmaker and a mysterious clock.",
]
