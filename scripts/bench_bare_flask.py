"""The floor for `make bench`: a bare Flask handler, run under the same gunicorn settings as the service.

`gunicorn --config gunicorn.conf.py scripts.bench_bare_flask:app`: POST /predict parses the JSON body and
answers a fixed one-row answer; no validation, model, logging or metrics. What the service adds on top
of this is ours to cut.
"""

from flask import Flask, request

app = Flask(__name__)


@app.post("/predict")
def predict():
    request.get_json()
    return {"predictions": ["setosa"], "probabilities": [{"setosa": 1.0, "versicolor": 0.0, "virginica": 0.0}]}
