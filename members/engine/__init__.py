"""The one prediction engine (`shared`), the stage-file predictions built on it (`predict`,
`predict_all`) and the scoring API and CLI (`scorer`, `score`)."""
