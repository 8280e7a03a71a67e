# One image for every gpulb role. The engine is a build argument:
#   docker build -t gpulb .                                  # balancer, gateway, simulated and openai workers, CLI
#   docker build -t gpulb:vllm --build-arg EXTRAS=vllm .    # a vLLM worker (its wheels bring the CUDA libraries)
#   docker build -t gpulb:trt --build-arg BASE_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:latest --build-arg EXTRAS=tensorrt .
# What pip installs is pinned by constraints.txt (gpulb's dependencies and the gateway extra; how to regenerate it is
# at its top). The engines are not pinned there: a GPU build passes its own, --build-arg CONSTRAINTS=constraints-vllm.txt
# (any constraints*.txt in the context is copied), or CONSTRAINTS= to let pip choose (see the README).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GPULB_LOG_FORMAT=json \
    HF_HOME=/var/cache/huggingface

WORKDIR /app
COPY pyproject.toml README.md constraints*.txt ./
COPY gpulb ./gpulb
COPY producer ./producer
COPY balancer ./balancer
COPY worker ./worker

ARG EXTRAS="gateway"
ARG CONSTRAINTS=constraints.txt
# The model cache (compose mounts the hf-cache volume here) is made now, owned by gpulb: a volume mounted on a path
# the image lacks is created root-owned, and the worker could not download a model into it.
RUN pip install ".${EXTRAS:+[$EXTRAS]}" ${CONSTRAINTS:+-c "$CONSTRAINTS"} \
 && groupadd --system --gid 10001 gpulb \
 && useradd --system --uid 10001 --gid gpulb --create-home gpulb \
 && install -d -o gpulb -g gpulb -m 0755 "$HF_HOME"

USER gpulb
# Prometheus metrics (--metrics-port 9100); the gateway (--port 8000)
EXPOSE 9100 8000
ENTRYPOINT ["gpulb"]
CMD ["--help"]
