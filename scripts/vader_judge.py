"""VADER's compound sentiment score (Hutto & Gilbert 2014) as a judge: a scorer this project did not write.

    python evaluate.py --models sft=runs/sft rto=runs/rto --judge py:scripts/vader_judge.py:compound ...
    python rto.py ... --eval_judge py:scripts/vader_judge.py:compound

pip install vaderSentiment (126 kB; its lexicon is inside the wheel). The score is in [-1, 1] and is 0 for a
response with no word of the lexicon. It can be gamed: "!" and ALL-CAPS words raise its magnitude, and repeating a
positive word adds to it; scripts/real_miniature.py measures how often each method's responses do that.
"""

ANALYZER = []  # built once, on the first call


def compound(prompts, responses):
    """One VADER compound score per response; the prompts are not read."""
    if not ANALYZER:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        ANALYZER.append(SentimentIntensityAnalyzer())
    return [ANALYZER[0].polarity_scores(r)["compound"] for r in responses]
