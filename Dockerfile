# The budgetflow image: the workers, the CLI and the setup Job of the Helm chart.
# Built from the repository root:  docker build -t budgetflow:0.1.0 .
# (Not built in this project's CI: its machine has no container engine.)
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY schemas schemas
COPY streams streams
COPY tokenizers tokenizers
RUN pip wheel --no-cache-dir --wheel-dir /wheels --constraint constraints.txt .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 BUDGETFLOW_DATA_DIR=/data
RUN groupadd --gid 10001 budgetflow \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /data budgetflow \
 && mkdir /data && chown 10001:10001 /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels budgetflow && rm -rf /wheels
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8085 9108
ENTRYPOINT ["budgetflow"]
CMD ["--help"]
