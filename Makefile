# AHIQ NTIRE kit. `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXPERIMENT ?= configs/ahiq_c.yaml
DEMO := configs/demo.yaml
# Where the accelerators are: GPUS=0,1,2,3 GPUS_PER_MEMBER=1 (members side by side) or all (DDP).
GPUS ?=
GPUS_PER_MEMBER ?= 1
CPU_PROCS ?= 2
# local: members on this machine (above); slurm: one SLURM job per member through submitit
# (members.launch.slurm; `pip install -e .[cluster]`), e.g. SLURM_ARGS="--wait --set cluster.partition=gpu".
LAUNCHER ?= local
SLURM_ARGS ?=
# test: the final test-phase zip; valid: the development-phase zip of the NTIRE validation folder.
PHASE ?= test

.PHONY: help install test demo demo-data weights train-members predict-all ensemble submit score bench clean-demo

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install requirements (re-runs only when requirements.txt changes)

test: $(STAMP)  ## run the test suite (CPU, tiny configs, a few minutes)
	$(PY) -m pytest -q

demo-data: $(STAMP)  ## generate the small synthetic-label demo dataset in data/demo
	$(PY) -m members.data.demo_data --out data/demo

weights: $(STAMP)  ## download the configured backbone weights and the authors' checkpoint into weights/
	$(PY) -m members.model.weights -c $(EXPERIMENT) --out weights

train-members: $(STAMP)  ## train every member of EXPERIMENT (resumable), then predict val and test
ifeq ($(LAUNCHER),slurm)
	$(PY) -m members.launch.slurm -c $(EXPERIMENT) $(SLURM_ARGS)
else ifeq ($(LAUNCHER),local)
	$(PY) -m members.launch.experiment -c $(EXPERIMENT) --gpus "$(GPUS)" --gpus-per-member $(GPUS_PER_MEMBER) --cpu-procs $(CPU_PROCS)
else
	$(error LAUNCHER=$(LAUNCHER): expected local or slurm)
endif

predict-all: $(STAMP)  ## re-predict EXPERIMENT's trained members at once, sharing backbones and reference work
	$(PY) -m members.engine.predict_all -c $(EXPERIMENT)

ensemble: $(STAMP)  ## fit the ensemble of EXPERIMENT's members (grouped CV) and write its report
	$(PY) -m ensemble -c $(EXPERIMENT)

submit: $(STAMP)  ## write and check EXPERIMENT's submission zip (PHASE=valid: the development-phase zip)
	$(PY) -m submission -c $(EXPERIMENT) --phase $(PHASE)

demo: $(STAMP)  ## the whole pipeline on the demo data, on the CPU (minutes)
	$(MAKE) --no-print-directory demo-data
	$(MAKE) --no-print-directory train-members ensemble submit EXPERIMENT=$(DEMO)
	$(MAKE) --no-print-directory submit EXPERIMENT=$(DEMO) PHASE=valid
	@echo "demo scores (SRCC/PLCC against the synthetic proxy labels; test = hidden labels of other photos, README \"The demo\"):"
	@$(PY) -m ensemble.hidden -c $(DEMO) --labels data/demo/demo_test_labels
	@echo "report: runs/demo/ensemble/report.md  test-phase zip: runs/demo/submission.zip  development-phase zip: runs/demo/submission_valid.zip"

score: $(STAMP)  ## score your own pairs: make score ARGS="--ensemble runs/demo DIS.png REF.png" (--help lists all)
	$(PY) -m members.engine.score $(if $(ARGS),$(ARGS),--help)

bench: $(STAMP)  ## speed/memory of the kit vs the release's way: tiny, ViT-B/8, AHIQ-C (writes bench/results/; ~1 h on 2 CPU cores)
	$(PY) -m bench.run --out bench/results

clean-demo:  ## remove the demo data and runs
	rm -rf data/demo runs/demo
