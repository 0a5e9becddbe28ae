"""VQA accuracy as the official VQA evaluation computes it.

Answers are normalised (newlines/tabs to spaces; punctuation removed, or replaced by a
space between words; a period that is not a decimal point dropped; lower case; number
words to digits; articles a/an/the dropped; common contractions restored). The soft
score of an answer against 10 human answers is the mean, over the 10 subsets of 9
annotators, of min(#matching answers in the subset / 3, 1).
"""
import re

_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
    "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hes": "he's", "im": "i'm", "isnt": "isn't", "itd": "it'd",
    "ive": "i've", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's",
    "theyre": "they're", "wasnt": "wasn't", "werent": "weren't", "whats": "what's",
    "wheres": "where's", "whos": "who's", "wont": "won't", "wouldnt": "wouldn't",
    "youre": "you're", "youve": "you've",
}


def _punctuation(text: str) -> str:
  out = text
  for p in _PUNCT:
    if (p + " " in text or " " + p in text) or _COMMA_NUMBER.search(text):
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD.sub("", out)


def normalize_answer(answer: str) -> str:
  text = _punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
  words = []
  for word in text.lower().split():
    word = _NUMBERS.get(word, word)
    if word not in _ARTICLES:
      words.append(_CONTRACTIONS.get(word, word))
  return " ".join(words)


def vqa_accuracy(answer: str, human_answers: list[str]) -> float:
  """Soft accuracy of one answer against the annotators' answers (usually 10)."""
  if not human_answers:
    raise ValueError("vqa_accuracy needs at least one human answer.")
  answer = normalize_answer(answer)
  truth = [normalize_answer(a) for a in human_answers]
  scores = []
  for i in range(len(truth)):
    others = truth[:i] + truth[i + 1:]
    scores.append(min(1.0, sum(a == answer for a in others) / 3.0))
  return sum(scores) / len(scores)


def mean_vqa_accuracy(answers: list[str], human_answers: list[list[str]]) -> float:
  if len(answers) != len(human_answers) or not answers:
    raise ValueError(f"{len(answers)} answers for {len(human_answers)} questions.")
  return sum(vqa_accuracy(a, h) for a, h in zip(answers, human_answers)) / len(answers)
