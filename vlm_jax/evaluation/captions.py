"""Caption metrics as coco-caption computes them: CIDEr-D and corpus BLEU-1..4.

Captions are tokenised like coco-caption's PTB tokeniser does for plain English: lower case,
punctuation removed, split on whitespace.

CIDEr-D (Vedantam et al. 2015; pycocoevalcap `cider_scorer.py`): for n = 1..4, each caption
is a tf-idf vector over its n-grams, tf = count, idf = log(#images) - log(max(1, df)) with
df = the number of images whose references contain the n-gram (candidates never count).
Per n, the similarity to a reference is sum(min(c, r) * r) / (|c| |r|) times the Gaussian
length penalty exp(-(len_c - len_r)^2 / (2 * 6^2)), where "length" is the number of bigrams,
as in the reference code; the image's score is 10 x the mean over n of the mean over its
references; the corpus score is the mean over images. With a single image every idf is 0.
"""
import collections
import math
import re

_PUNCT = re.compile(r"[^\w\s]")


def tokenize(text: str) -> list[str]:
  return _PUNCT.sub(" ", text.lower()).split()


def ngram_counts(words, max_n: int = 4) -> collections.Counter:
  return collections.Counter(tuple(words[i:i + n]) for n in range(1, max_n + 1)
                             for i in range(len(words) - n + 1))


def _check(candidates, references):
  if len(candidates) != len(references) or not candidates:
    raise ValueError(f"{len(candidates)} candidates for {len(references)} reference sets: "
                     "need one candidate per image and at least one image.")
  for i, refs in enumerate(references):
    if isinstance(refs, str) or not refs:
      raise ValueError(f"references[{i}] must be a non-empty list of strings, got {refs!r}")


def cider_scores(candidates: list[str], references: list[list[str]], sigma: float = 6.0,
                 max_n: int = 4) -> list[float]:
  """Per-image CIDEr-D of candidates[i] against references[i] (corpus idf)."""
  _check(candidates, references)
  refs = [[ngram_counts(tokenize(r), max_n) for r in rs] for rs in references]
  cands = [ngram_counts(tokenize(c), max_n) for c in candidates]
  df = collections.Counter(g for rs in refs for g in set().union(*rs))
  log_images = math.log(float(len(refs)))

  def vector(counts):
    vec = [dict() for _ in range(max_n)]
    for gram, tf in counts.items():
      vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, df[gram])))
    norms = [math.sqrt(sum(v * v for v in vn.values())) for vn in vec]
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vec, norms, length

  def similarity(cand, ref):
    (cv, cn, cl), (rv, rn, rl) = cand, ref
    penalty = math.exp(-((cl - rl) ** 2) / (2 * sigma ** 2))
    total = 0.0
    for n in range(max_n):
      dot = sum(min(v, rv[n].get(g, 0.0)) * rv[n].get(g, 0.0) for g, v in cv[n].items())
      if cn[n] and rn[n]:
        dot /= cn[n] * rn[n]
      total += dot * penalty
    return total / max_n

  scores = []
  for cand, rs in zip(cands, refs):
    c = vector(cand)
    scores.append(10.0 * sum(similarity(c, vector(r)) for r in rs) / len(rs))
  return scores


def cider(candidates: list[str], references: list[list[str]]) -> float:
  scores = cider_scores(candidates, references)
  return sum(scores) / len(scores)


def bleu(candidates: list[str], references: list[list[str]], max_n: int = 4) -> list[float]:
  """Corpus BLEU-1..max_n (Papineni et al.): clipped n-gram precisions summed over the
  corpus, geometric mean, brevity penalty against the closest reference length."""
  _check(candidates, references)
  matches, totals = [0] * max_n, [0] * max_n
  cand_len = ref_len = 0
  for cand, refs in zip(candidates, references):
    words = tokenize(cand)
    ref_words = [tokenize(r) for r in refs]
    cand_len += len(words)
    ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
    counts = ngram_counts(words, max_n)
    best = collections.Counter()
    for r in ref_words:
      best |= ngram_counts(r, max_n)  # per n-gram, the max count over references
    for gram, count in counts.items():
      matches[len(gram) - 1] += min(count, best[gram])
      totals[len(gram) - 1] += count
  brevity = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / max(cand_len, 1))
  out, log_sum = [], 0.0
  for n in range(max_n):
    if not matches[n]:
      out.extend([0.0] * (max_n - n))
      break
    log_sum += math.log(matches[n] / totals[n])
    out.append(brevity * math.exp(log_sum / (n + 1)))
  return out


def exact_match(candidates: list[str], references: list[list[str]]) -> float:
  """Fraction of candidates equal (after tokenisation) to one of their references."""
  _check(candidates, references)
  hits = sum(tokenize(c) in [tokenize(r) for r in rs] for c, rs in zip(candidates, references))
  return hits / len(candidates)
