"""The scikit-learn runtime's fast path for linear classifiers: taken only where it is sklearn's own
arithmetic, and then exactly sklearn's answers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier
from sklearn.svm import LinearSVC

from mlserve.runtimes.sklearn import SklearnRuntime


pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # unscaled data; irrelevant


class Thresholded(LogisticRegression):
    """Overrides ``predict``: the fast path must not stand in for it."""

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.zeros(len(X), dtype=int)


def rows(X: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(7)
    return np.vstack([X, rng.normal(X.mean(0), X.std(0) * 3, size=(500, X.shape[1]))])


@pytest.mark.parametrize("make", [
    lambda: LogisticRegression(max_iter=1000), lambda: SGDClassifier(random_state=0), lambda: LinearSVC(),
])
@pytest.mark.parametrize("data", [load_iris, load_breast_cancer], ids=["multiclass", "binary"])
def test_linear_classifiers_answer_exactly_as_sklearn_without_its_checks(make, data) -> None:  # type: ignore[no-untyped-def]
    X, y = data(return_X_y=True)
    estimator = make().fit(X, y)
    runtime = SklearnRuntime(estimator, X.shape[1])
    assert runtime._predict != estimator.predict, "the fast path is taken"
    batch = rows(X)
    assert np.array_equal(runtime.predict(batch), estimator.predict(batch))
    assert np.array_equal(runtime.predict(batch[:1]), estimator.predict(batch[:1]))


def test_a_row_not_finite_or_of_the_wrong_width_is_refused_as_sklearn_refuses_it() -> None:
    X, y = load_iris(return_X_y=True)
    runtime = SklearnRuntime(LogisticRegression(max_iter=1000).fit(X, y), 4)
    with pytest.raises(ValueError, match="NaN"):
        runtime.predict(np.array([[1.0, np.nan, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="features"):
        runtime.predict(np.array([[1.0, 2.0, 3.0]]))


@pytest.mark.parametrize("estimator", [Thresholded(max_iter=1000), RidgeClassifier(), RandomForestClassifier(n_estimators=5)])
def test_other_estimators_keep_their_own_predict(estimator: object) -> None:
    X, y = load_iris(return_X_y=True)
    estimator.fit(X, y)  # type: ignore[attr-defined]
    runtime = SklearnRuntime(estimator, 4)
    assert runtime._predict == estimator.predict  # type: ignore[attr-defined]
    assert np.array_equal(runtime.predict(X), estimator.predict(X))  # type: ignore[attr-defined]
