# AHIQ NTIRE kit. `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXPERIMENT ?= configs/ahiq_c.yaml
DEMO := configs/demo.yaml
# make demo-nr: blind members on the labels (a), the same on labels + the FR demo's pseudo-labels (b).
DEMO_NR := configs/demo_nr.yaml
DEMO_NR_STUDENT := configs/demo_nr_student.yaml
# 70 generated pairs per training reference: 5x its 14 labelled ones (700 for the demo's 10).
DEMO_NR_PSEUDO := --continuous --levels 0,3 --per-ref 70
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
# The zip's NTIRE track: fr (full reference) or nr (no reference); default: the experiment's track.
TRACK ?=
# Extra arguments for a target's command, e.g. ARGS="--set members.train.epochs=1 --set runs_dir=/tmp/r".
ARGS ?=
# make evaluate REPEATS=K: K random reference-disjoint splits (data.format csv), mean ± std.
REPEATS ?= 1
# make pseudo-label: what EXPERIMENT's fitted ensemble labels: generate (distorted training references), a CSV of
# pairs, or a folder of distorted images (REF=its reference folder); several separated by spaces.
SOURCE ?= generate
REF ?=

.PHONY: help install test test-fast demo demo-data weights train-members predict-all ensemble submit evaluate preflight score demo-nr pseudo-label bench scale gpu-check clean-demo

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install requirements (re-runs only when requirements.txt changes)

test: $(STAMP)  ## run the whole test suite, slow end-to-end tests included (CPU, tiny configs; 10-25 min on 2 cores)
	$(PY) -m pytest -q

test-fast: $(STAMP)  ## the test suite without the tests marked slow (end-to-end CLI runs, installs)
	$(PY) -m pytest -q -m "not slow"

demo-data: $(STAMP)  ## generate the small synthetic-label demo dataset in data/demo
	$(PY) -m members.data.demo_data --out data/demo

weights: $(STAMP)  ## download the configured backbone weights and the authors' checkpoint into weights/
	$(PY) -m members.model.weights -c $(EXPERIMENT) --out weights

LOCAL_FLAGS = --gpus "$(GPUS)" --gpus-per-member $(GPUS_PER_MEMBER) --cpu-procs $(CPU_PROCS)

train-members: $(STAMP)  ## train every member of EXPERIMENT (resumable), then predict val and test; ARGS="--set ..."
ifeq ($(LAUNCHER),slurm)
	$(PY) -m members.launch.slurm -c $(EXPERIMENT) $(SLURM_ARGS) $(ARGS)
else ifeq ($(LAUNCHER),local)
	$(PY) -m members.launch.experiment -c $(EXPERIMENT) $(LOCAL_FLAGS) $(ARGS)
else
	$(error LAUNCHER=$(LAUNCHER): expected local or slurm)
endif

preflight: $(STAMP)  ## before a long run: data layout, disk, and per member a few real steps, a state, predictions; time estimates (ARGS="--random-weights")
	$(PY) -m members.launch.preflight -c $(EXPERIMENT) $(LOCAL_FLAGS) $(ARGS)

predict-all: $(STAMP)  ## predict EXPERIMENT's trained members again (current or not), on GPUS / CPU_PROCS; ARGS
	$(PY) -m members.launch.experiment -c $(EXPERIMENT) $(LOCAL_FLAGS) $(ARGS) --predict-all

ensemble: $(STAMP)  ## fit the ensemble of EXPERIMENT's members (grouped CV) and write its report; ARGS="--set ..."
	$(PY) -m ensemble -c $(EXPERIMENT) $(ARGS)

submit: $(STAMP)  ## write and check EXPERIMENT's submission zip (PHASE=valid: the development-phase zip; TRACK=fr|nr); ARGS
	$(PY) -m submission -c $(EXPERIMENT) --phase $(PHASE) $(if $(TRACK),--track $(TRACK)) $(ARGS)

# REPEATS=K: repeat k trains, predicts and fits into <runs_dir>/repeat_<k> with data.split_seed k (done
# repeats are reused), then one table of mean ± std; ARGS then goes to every command, so only --set there.
evaluate: $(STAMP)  ## SRCC/PLCC/KRCC with intervals of members and ensemble on the labelled test split (ARGS="--labels DIR", REPEATS=K)
ifeq ($(REPEATS),1)
	$(PY) -m ensemble.evaluate -c $(EXPERIMENT) $(ARGS)
else
	@runs="$$($(PY) -m ensemble.evaluate -c $(EXPERIMENT) $(ARGS) --repeats $(REPEATS) --print-runs-dir)" || exit 2; \
	k=0; while [ $$k -lt $(REPEATS) ]; do \
	  sets="--set runs_dir=$$runs/repeat_$$k --set members.data.split_seed=$$k"; \
	  echo "repeat $$k of $(REPEATS): $$runs/repeat_$$k"; \
	  $(PY) -m members.launch.experiment -c $(EXPERIMENT) $(LOCAL_FLAGS) $(ARGS) $$sets || exit 2; \
	  $(PY) -m ensemble -c $(EXPERIMENT) $(ARGS) $$sets || exit 2; \
	  k=$$((k + 1)); \
	done; \
	$(PY) -m ensemble.evaluate -c $(EXPERIMENT) $(ARGS) --repeats $(REPEATS)
endif

demo: $(STAMP)  ## the whole pipeline on the demo data, on the CPU (minutes)
	$(MAKE) --no-print-directory demo-data
	$(MAKE) --no-print-directory train-members ensemble submit EXPERIMENT=$(DEMO)
	$(MAKE) --no-print-directory submit EXPERIMENT=$(DEMO) PHASE=valid
	@echo "demo scores (against the synthetic proxy labels; test = hidden labels of other photos, README \"The demo\"):"
	@$(PY) -m ensemble.evaluate -c $(DEMO) --labels data/demo/demo_test_labels
	@echo "report: runs/demo/ensemble/report.md  test-phase zip: runs/demo/submission.zip  development-phase zip: runs/demo/submission_valid.zip"

demo-nr: $(STAMP)  ## after make demo: blind (NR) members on the labels (a), on labels + the FR demo's pseudo-labels (b), vs the FR demo (c)
	$(MAKE) --no-print-directory pseudo-label EXPERIMENT=$(DEMO) SOURCE=generate ARGS="$(DEMO_NR_PSEUDO)"
	$(MAKE) --no-print-directory train-members ensemble submit EXPERIMENT=$(DEMO_NR)
	$(MAKE) --no-print-directory train-members ensemble submit EXPERIMENT=$(DEMO_NR_STUDENT)
	@for exp in $(DEMO_NR) $(DEMO_NR_STUDENT); do \
	  $(PY) -m ensemble.evaluate -c $$exp --labels data/demo/demo_nr_test_labels > /dev/null || exit 2; done
	@$(PY) -m ensemble.evaluate -c $(DEMO) --labels data/demo/demo_test_labels > /dev/null
	@echo "NR demo (hidden NR test labels; (c): the FR demo on the same images with their references):"
	@$(PY) -m ensemble.compare "(a) NR, labels=runs/demo_nr/ensemble/evaluation_test.json" \
	  "(b) NR student, labels + pseudo-labels=runs/demo_nr_student/ensemble/evaluation_test.json" \
	  "(c) FR demo=runs/demo/ensemble/evaluation_test.json" --vs "(c) FR demo"
	@echo "members: runs/demo_nr*/ensemble/evaluation_test.md  NR zips: runs/demo_nr/submission.zip runs/demo_nr_student/submission.zip"

pseudo-label: $(STAMP)  ## label SOURCE pairs with EXPERIMENT's fitted ensemble -> <runs_dir>/pseudo_labels (data.pseudo_labels); ARGS
	$(PY) -m members.launch.pseudo_label -c $(EXPERIMENT) --source $(SOURCE) $(if $(REF),--ref-dir $(REF)) $(ARGS)

score: $(STAMP)  ## score your own pairs: make score ARGS="--ensemble runs/demo DIS.png REF.png" (--help lists all)
	$(PY) -m members.engine.score $(if $(ARGS),$(ARGS),--help)

bench: $(STAMP)  ## speed/memory of the kit vs the release's way: tiny, ViT-B/8, AHIQ-C (writes bench/results/; ~1 h on 2 CPU cores)
	$(PY) -m bench.run --out bench/results

scale: $(STAMP)  ## the kit's own costs at PIPAL's real size (tree, data check, step, states, logs, hashing) -> bench/scale.md (~30 min on 2 CPU cores)
	$(PY) -m bench.scale $(ARGS)

gpu-check: $(STAMP)  ## on a GPU machine: preflight, bf16 steps, deform and Scorer on CUDA, slot plan, bench row -> bench/results/gpu_check.md (<10 min)
	$(PY) -m bench.gpu_check $(ARGS)

clean-demo:  ## remove the demo data and runs
	rm -rf data/demo runs/demo runs/demo_nr runs/demo_nr_student
