/*
 * A test double of librkllmrt.so, the Rockchip NPU LLM runtime.
 *
 * One source, compiled once per ABI generation:
 *     cc -shared -fPIC -pthread -DFAKE_ABI_MINOR=2 ...   (ABI 1.2.x layouts)
 *     cc -shared -fPIC -pthread -DFAKE_ABI_MINOR=3 ...   (ABI 1.3.x layouts)
 *
 * It exports every function of the runtime, calls back from C with token
 * streams scripted by directives inside the prompt text (see docs/INTERNALS.md,
 * "The librkllmrt double"), fills perf stats, embeds and prints a version string
 * like the real library, records every call as a JSON line in the file named by
 * FAKE_RKLLM_RECORD, and reports its own struct layout through
 * fake_rkllm_layout() so the tests can hold the ctypes declarations against it.
 *
 * The struct declarations below are written from the project's ABI notes; they
 * are not the SDK header.
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>

#ifndef FAKE_ABI_MINOR
#error "compile with -DFAKE_ABI_MINOR=2 or -DFAKE_ABI_MINOR=3"
#endif

#if FAKE_ABI_MINOR == 2
#define FAKE_VERSION "1.2.3"
#elif FAKE_ABI_MINOR == 3
#define FAKE_VERSION "1.3.0"
#else
#error "FAKE_ABI_MINOR must be 2 or 3"
#endif

/* Kept in .rodata whole, the way a real build embeds its banner, so the
 * binding can find the generation by scanning the file. */
const char fake_rkllm_version_banner[] = "rkllm-runtime version: " FAKE_VERSION;

#define HIDDEN_WIDTH 64
#define LOGITS_VOCAB 256       /* the double's vocabulary, for GET_LOGITS */
#define LOGITS_EARLIER -50.0f  /* every logit of a row before the last one */
#define HANG_LIMIT_MS 120000 /* a forgotten @@hang@@ still ends, so test runs stay bounded */

/* ------------------------------------------------------------------ types */

typedef void *LLMHandle;

enum { STATE_NORMAL = 0, STATE_WAITING = 1, STATE_FINISH = 2, STATE_ERROR = 3 };
enum { INPUT_PROMPT = 0, INPUT_TOKEN = 1, INPUT_EMBED = 2, INPUT_MULTIMODAL = 3 };
enum { MODE_GENERATE = 0, MODE_LAST_HIDDEN = 1, MODE_LOGITS = 2 };

typedef struct {
    int32_t base_domain_id;
    int8_t embed_flash;
    int8_t enabled_cpus_num;
    uint32_t enabled_cpus_mask;
    uint8_t n_batch;
    int8_t use_cross_attn;
    uint8_t reserved[104];
} RKLLMExtendParam;

typedef struct {
    const char *model_path;
    int32_t max_context_len;
    int32_t max_new_tokens;
    int32_t top_k;
    int32_t n_keep;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
    bool skip_special_token;
#if FAKE_ABI_MINOR >= 3
    bool ignore_eos_token;
#endif
    bool is_async;
#if FAKE_ABI_MINOR == 2
    const char *img_start;
    const char *img_end;
    const char *img_content;
#endif
    RKLLMExtendParam extend_param;
} RKLLMParam;

typedef struct {
    const char *lora_adapter_path;
    const char *lora_adapter_name;
    float scale;
} RKLLMLoraAdapter;

typedef struct {
    float *embed;
    size_t n_tokens;
} RKLLMEmbedInput;

typedef struct {
    int32_t *input_ids;
    size_t n_tokens;
} RKLLMTokenInput;

#if FAKE_ABI_MINOR == 2
typedef struct {
    char *prompt;
    float *image_embed;
    size_t n_image_tokens;
    size_t n_image;
    size_t image_width;
    size_t image_height;
} RKLLMMultiModalInput;
#else
typedef struct {
    float *image_embed;
    size_t n_image_tokens;
    size_t n_image;
    const char *image_start;
    const char *image_end;
    const char *image_content;
    size_t image_width;
    size_t image_height;
} RKLLMImageBlock;

typedef struct {
    float *video_embed;
    size_t n_frame_tokens;
    size_t n_frame_per_video;
    size_t n_video;
    const char *video_start;
    const char *video_end;
    const char *video_content;
    size_t frame_width;
    size_t frame_height;
} RKLLMVideoBlock;

typedef struct {
    char *prompt;
    RKLLMImageBlock image;
    RKLLMVideoBlock video;
} RKLLMMultiModalInput;
#endif

typedef struct {
    const char *role;
    bool enable_thinking;
    int input_type;
    union {
        const char *prompt_input;
        RKLLMEmbedInput embed_input;
        RKLLMTokenInput token_input;
        RKLLMMultiModalInput multimodal_input;
    };
} RKLLMInput;

typedef struct {
    const char *lora_adapter_name;
} RKLLMLoraParam;

typedef struct {
    int save_prompt_cache;
    const char *prompt_cache_path;
} RKLLMPromptCacheParam;

#if FAKE_ABI_MINOR >= 3
typedef struct {
    int32_t top_k;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
} RKLLMSamplingParam;
#endif

typedef struct {
    int mode;
    RKLLMLoraParam *lora_params;
    RKLLMPromptCacheParam *prompt_cache_params;
#if FAKE_ABI_MINOR >= 3
    RKLLMSamplingParam *sampling_params;
#endif
    int keep_history;
#if FAKE_ABI_MINOR >= 3
    int32_t max_new_tokens;
#endif
} RKLLMInferParam;

typedef struct {
    const float *hidden_states;
    int embd_size;
    int num_tokens;
} RKLLMResultLastHiddenLayer;

typedef struct {
    const float *logits;
    int vocab_size;
    int num_tokens;
} RKLLMResultLogits;

typedef struct {
    float prefill_time_ms;
    int prefill_tokens;
    float generate_time_ms;
    int generate_tokens;
    float memory_usage_mb;
} RKLLMPerfStat;

typedef struct {
    const char *text;
    int32_t token_id;
    RKLLMResultLastHiddenLayer last_hidden_layer;
    RKLLMResultLogits logits;
    RKLLMPerfStat perf;
} RKLLMResult;

typedef int (*LLMResultCallback)(RKLLMResult *result, void *userdata, int state);

#if FAKE_ABI_MINOR >= 3
typedef struct {
    LLMResultCallback result_callback;
    void *result_userdata;
    void *tokenizer_callback;
    void *tokenizer_userdata;
    void *embed_callback;
    void *embed_userdata;
} RKLLMCallback;
#endif

/* The model behind a handle. */
typedef struct {
    char model_path[4096];
    RKLLMParam param;
    LLMResultCallback callback;
    void *callback_userdata; /* 1.3 passes one at init; 1.2 has only the per-run one */
    atomic_int abort_requested;
    atomic_int running;
    int kv_length;            /* words kept in the "KV cache" */
    int loaded_cache_length;  /* KV words restored from a prompt cache, or -1 */
    int unreleased_outputs;   /* hidden-layer outputs the callback did not release */
} FakeModel;

/* --------------------------------------------------------------- recording */

static pthread_mutex_t record_lock = PTHREAD_MUTEX_INITIALIZER;

static void json_string(FILE *out, const char *text) {
    if (text == NULL) {
        fputs("null", out);
        return;
    }
    fputc('"', out);
    for (const unsigned char *p = (const unsigned char *)text; *p; p++) {
        if (*p == '"' || *p == '\\') {
            fputc('\\', out);
            fputc(*p, out);
        } else if (*p < 0x20) {
            fprintf(out, "\\u%04x", *p);
        } else {
            fputc(*p, out); /* UTF-8 bytes pass through: JSON allows them raw */
        }
    }
    fputc('"', out);
}

/* Opens the record file for one JSON line, or returns NULL when recording is off. */
static FILE *record_begin(const char *call) {
    const char *path = getenv("FAKE_RKLLM_RECORD");
    if (path == NULL || *path == '\0') return NULL;
    pthread_mutex_lock(&record_lock);
    FILE *out = fopen(path, "a");
    if (out == NULL) {
        pthread_mutex_unlock(&record_lock);
        return NULL;
    }
    fprintf(out, "{\"call\": \"%s\", \"abi\": \"%s\"", call, FAKE_VERSION);
    return out;
}

static void record_end(FILE *out) {
    if (out == NULL) return;
    fputs("}\n", out);
    fclose(out);
    pthread_mutex_unlock(&record_lock);
}

static void record_simple(const char *call) { record_end(record_begin(call)); }

/* ----------------------------------------------------------------- helpers */

static long long now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

/* Sleeps up to ms, waking early (within 1 ms) when an abort arrives. */
static void sleep_unless_aborted(FakeModel *model, int ms) {
    for (int waited = 0; waited < ms && !atomic_load(&model->abort_requested); waited++)
        sleep_ms(1);
}

static int count_words(const char *text) {
    int words = 0, in_word = 0;
    for (const unsigned char *p = (const unsigned char *)text; p && *p; p++) {
        int space = (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r');
        if (!space && !in_word) words++;
        in_word = !space;
    }
    return words;
}

/* Finds "@@name:" or "@@name@@" in the prompt; returns the argument start (or
 * the end of the directive when it has none) and its length, or NULL. */
static const char *find_directive(const char *prompt, const char *name, size_t *arg_len) {
    char opener[64];
    snprintf(opener, sizeof opener, "@@%s", name);
    size_t opener_len = strlen(opener);
    for (const char *at = strstr(prompt, opener); at; at = strstr(at + 1, opener)) {
        const char *after = at + opener_len;
        if (after[0] == '@' && after[1] == '@') {
            *arg_len = 0;
            return after;
        }
        if (after[0] == ':') {
            const char *end = strstr(after + 1, "@@");
            if (end == NULL) return NULL;
            *arg_len = (size_t)(end - (after + 1));
            return after + 1;
        }
    }
    return NULL;
}

static int directive_int(const char *prompt, const char *name, int fallback) {
    size_t len;
    const char *arg = find_directive(prompt, name, &len);
    return (arg && len > 0) ? atoi(arg) : fallback;
}

static int has_directive(const char *prompt, const char *name) {
    size_t len;
    return find_directive(prompt, name, &len) != NULL;
}

static int utf8_length(unsigned char lead) {
    if (lead >= 0xF0) return 4;
    if (lead >= 0xE0) return 3;
    if (lead >= 0xC0) return 2;
    return 1;
}

/* ------------------------------------------------------------ one run */

typedef struct {
    FakeModel *model;
    void *userdata;
    RKLLMResult result;
    int tokens;      /* text callbacks made: the double's notion of a token */
    int limit;       /* stop after this many tokens (max_new_tokens), <=0: none */
    int slow_ms;
    int error_after; /* ERROR after this many tokens, or -1 */
    int split_at;    /* bytes of a multi-byte character sent WAITING; 0 = one per byte */
    long long started_us;
    const char *crash_kind; /* @@crash:KIND@@: die after crash_after tokens, or NULL */
    size_t crash_kind_len;
    int crash_after;
} Stream;

/* ---- crashes (@@crash:KIND@@ in a prompt, @@init_crash:KIND@@ heading a model file):
 * the ways the real library dies (SIGSEGV, abort(), SIGILL on a CPU without SVE, a call
 * to exit()), so tests can see the server outlive them. Recorded first. */
#define CRASH_EXIT_STATUS 3

static void crash_now(const char *kind, size_t len) {
    char name[16] = {0};
    snprintf(name, sizeof name, "%.*s", (int)(len < sizeof name ? len : sizeof name - 1), kind);
    FILE *out = record_begin("crash");
    if (out) {
        fputs(", \"kind\": ", out);
        json_string(out, name);
        record_end(out);
    }
    fflush(NULL);
    if (strcmp(name, "segv") == 0) {
        volatile int *nowhere = NULL;
        *nowhere = 1;          /* a real invalid write, as a bad pointer in the library */
        raise(SIGSEGV);
    } else if (strcmp(name, "abort") == 0) {
        abort();
    } else if (strcmp(name, "ill") == 0) {
        raise(SIGILL);
    } else if (strcmp(name, "exit") == 0) {
        exit(CRASH_EXIT_STATUS);
    }
    fprintf(stderr, "E rkllm: unknown crash kind %s\n", name);
    abort();
}

static void crash_if_due(Stream *s) {
    if (s->crash_kind != NULL && s->tokens >= s->crash_after)
        crash_now(s->crash_kind, s->crash_kind_len);
}

/* 0 = go on; 1 = stop (abort, length or scripted error handled by the caller). */
static int stream_should_stop(Stream *s) {
    if (atomic_load(&s->model->abort_requested)) return 1;
    if (s->limit > 0 && s->tokens >= s->limit) return 1;
    if (s->error_after >= 0 && s->tokens >= s->error_after) return 1;
    return 0;
}

static void emit(Stream *s, const char *text, int state) {
    s->result.text = text;
    s->result.token_id = s->tokens;
    s->model->callback(&s->result, s->userdata, state);
}

/* One token: its bytes go out in one NORMAL callback. */
static int emit_token(Stream *s, const char *text) {
    crash_if_due(s);
    if (stream_should_stop(s)) return 1;
    if (s->slow_ms > 0) {
        sleep_unless_aborted(s->model, s->slow_ms);
        if (atomic_load(&s->model->abort_requested)) return 1;
    }
    emit(s, text, STATE_NORMAL);
    s->tokens++;
    return 0;
}

/* One character: multi-byte characters are split, leading part(s) WAITING. */
static int emit_character(Stream *s, const char *ch, int len) {
    char piece[8];
    if (len == 1 || s->split_at >= len) {
        memcpy(piece, ch, (size_t)len);
        piece[len] = '\0';
        return emit_token(s, piece);
    }
    if (s->split_at == 0) { /* every byte its own callback */
        for (int i = 0; i < len; i++) {
            if (stream_should_stop(s)) return 1;
            piece[0] = ch[i];
            piece[1] = '\0';
            emit(s, piece, i + 1 < len ? STATE_WAITING : STATE_NORMAL);
            s->tokens++;
        }
        return 0;
    }
    if (stream_should_stop(s)) return 1;
    memcpy(piece, ch, (size_t)s->split_at);
    piece[s->split_at] = '\0';
    emit(s, piece, STATE_WAITING);
    s->tokens++;
    memcpy(piece, ch + s->split_at, (size_t)(len - s->split_at));
    piece[len - s->split_at] = '\0';
    return emit_token(s, piece);
}

static void stream_reply(Stream *s, const char *text, size_t len) {
    for (size_t i = 0; i < len;) {
        int n = utf8_length((unsigned char)text[i]);
        if (i + (size_t)n > len) n = (int)(len - i);
        if (emit_character(s, text + i, n)) return;
        i += (size_t)n;
    }
}

static void stream_count(Stream *s, int count) {
    char token[32];
    for (int i = 0; i < count; i++) {
        snprintf(token, sizeof token, i == 0 ? "tok%d" : " tok%d", i);
        if (emit_token(s, token)) return;
    }
}

static void stream_default(Stream *s) {
    static const char *const words[] = {"Hello", " from", " the", " NPU", " double."};
    for (size_t i = 0; i < sizeof words / sizeof words[0]; i++)
        if (emit_token(s, words[i])) return;
}

static void stream_hang(Stream *s) {
    if (emit_token(s, "waiting")) return;
    for (int waited = 0; waited < HANG_LIMIT_MS && !atomic_load(&s->model->abort_requested);
         waited++)
        sleep_ms(1);
}

static void fill_perf(Stream *s, int prefill_tokens, long long prefill_end_us) {
    long long end = now_us();
    s->result.perf.prefill_tokens = prefill_tokens;
    s->result.perf.prefill_time_ms = (float)(prefill_end_us - s->started_us) / 1000.0f;
    s->result.perf.generate_tokens = s->tokens;
    s->result.perf.generate_time_ms = (float)(end - prefill_end_us) / 1000.0f;
    s->result.perf.memory_usage_mb = 42.0f;
}

/* Give the callback an output buffer (a hidden layer or logits, set in s->result)
 * and record it as `call`: tokens rows of `width` values (`width_key` in the record).
 * 1.3: a callback answering 2 releases the buffer. Without it the buffer stays
 * allocated until the handle is destroyed (the leak of rknn-llm issue 504; 1.2 has
 * no way to release it). The double keeps count, for the tests. 1: released. */
static int hand_out(Stream *s, const char *call, const char *width_key, int tokens,
                    int width) {
    int answer = s->model->callback(&s->result, s->userdata, STATE_NORMAL);
    int released = FAKE_ABI_MINOR >= 3 && answer == 2;
    if (!released) s->model->unreleased_outputs++;
    FILE *out = record_begin(call);
    if (out) {
        fprintf(out, ", \"num_tokens\": %d, \"%s\": %d, \"callback_return\": %d"
                ", \"released\": %s, \"unreleased_outputs\": %d",
                tokens, width_key, width, answer, released ? "true" : "false",
                s->model->unreleased_outputs);
        record_end(out);
    }
    return released;
}

/* The last hidden layer of the prompt: num_tokens x HIDDEN_WIDTH floats, each
 * row derived from its word so the same text always embeds the same way. */
static void run_embedding(Stream *s, const char *prompt) {
    int tokens = count_words(prompt);
    if (tokens < 1) tokens = 1;
    float *hidden = calloc((size_t)tokens * HIDDEN_WIDTH, sizeof(float));
    if (hidden == NULL) {
        emit(s, NULL, STATE_ERROR);
        return;
    }
    const unsigned char *p = (const unsigned char *)prompt;
    for (int row = 0; row < tokens; row++) {
        uint32_t hash = 2166136261u;
        while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r') p++;
        while (*p && *p != ' ' && *p != '\n' && *p != '\t' && *p != '\r') hash = (hash ^ *p++) * 16777619u;
        for (int col = 0; col < HIDDEN_WIDTH; col++) {
            hash = hash * 1664525u + 1013904223u;
            hidden[row * HIDDEN_WIDTH + col] = (float)(hash >> 8) / 16777216.0f - 0.5f;
        }
    }
    s->result.last_hidden_layer.hidden_states = hidden;
    s->result.last_hidden_layer.embd_size = HIDDEN_WIDTH;
    s->result.last_hidden_layer.num_tokens = tokens;
    s->result.text = NULL;
    s->result.token_id = 0;
    int released = hand_out(s, "hidden_layer", "embd_size", tokens, HIDDEN_WIDTH);
    if (released) { /* what the library gave the callback is gone now */
        memset(hidden, 0, (size_t)tokens * HIDDEN_WIDTH * sizeof(float));
        s->result.last_hidden_layer.hidden_states = NULL;
        s->result.last_hidden_layer.num_tokens = 0;
    }
    fill_perf(s, tokens, now_us());
    emit(s, NULL, STATE_FINISH);
    s->result.last_hidden_layer.hidden_states = NULL;
    free(hidden);
}

/* GET_LOGITS: LOGITS_VOCAB logits for every prompt word, the last row being the
 * next token's. Earlier rows hold LOGITS_EARLIER (a binding reading the wrong row
 * sees it); the last row is 0 except what `@@logits:ID=VALUE,ID=VALUE@@` in the
 * prompt sets, so a test scripts the answer's yes/no logits per document. Released
 * like a hidden layer (2 from the callback on 1.3), recorded as a `logits` line. */
static void run_logits(Stream *s, const char *prompt) {
    int tokens = count_words(prompt);
    if (tokens < 1) tokens = 1;
    float *logits = malloc((size_t)tokens * LOGITS_VOCAB * sizeof(float));
    if (logits == NULL) {
        emit(s, NULL, STATE_ERROR);
        return;
    }
    for (int i = 0; i < tokens * LOGITS_VOCAB; i++) logits[i] = LOGITS_EARLIER;
    float *last = logits + (size_t)(tokens - 1) * LOGITS_VOCAB;
    memset(last, 0, LOGITS_VOCAB * sizeof(float));
    size_t len;
    const char *script = find_directive(prompt, "logits", &len);
    for (const char *p = script, *end = script ? script + len : NULL; p && p < end;) {
        char *after;
        long id = strtol(p, &after, 10);
        if (after == p || *after != '=') break;
        float value = strtof(after + 1, &after);
        if (id >= 0 && id < LOGITS_VOCAB) last[id] = value;
        p = (*after == ',') ? after + 1 : end;
    }
    s->result.logits.logits = logits;
    s->result.logits.vocab_size = LOGITS_VOCAB;
    s->result.logits.num_tokens = tokens;
    s->result.text = NULL;
    int released = hand_out(s, "logits", "vocab_size", tokens, LOGITS_VOCAB);
    if (released) {
        memset(logits, 0, (size_t)tokens * LOGITS_VOCAB * sizeof(float));
        s->result.logits.logits = NULL;
        s->result.logits.num_tokens = 0;
    }
    fill_perf(s, tokens, now_us());
    emit(s, NULL, STATE_FINISH);
    s->result.logits.logits = NULL;
    free(logits);
}

static void save_prompt_cache(const char *path, int kv_length) {
    FILE *out = fopen(path, "w");
    if (out == NULL) return;
    fprintf(out, "FAKE_RKLLM_PROMPT_CACHE kv=%d\n", kv_length);
    fclose(out);
}

/* ------------------------------------------------------------ recording runs */

static void record_init(const RKLLMParam *p) {
    FILE *out = record_begin("init");
    if (out == NULL) return;
    fputs(", \"model_path\": ", out);
    json_string(out, p->model_path);
    fprintf(out,
            ", \"max_context_len\": %d, \"max_new_tokens\": %d, \"top_k\": %d, \"n_keep\": %d"
            ", \"top_p\": %g, \"temperature\": %g, \"repeat_penalty\": %g"
            ", \"frequency_penalty\": %g, \"presence_penalty\": %g, \"mirostat\": %d"
            ", \"skip_special_token\": %d, \"is_async\": %d"
            ", \"base_domain_id\": %d, \"embed_flash\": %d, \"enabled_cpus_num\": %d"
            ", \"enabled_cpus_mask\": %u, \"n_batch\": %d",
            p->max_context_len, p->max_new_tokens, p->top_k, p->n_keep, p->top_p,
            p->temperature, p->repeat_penalty, p->frequency_penalty, p->presence_penalty,
            p->mirostat, p->skip_special_token, p->is_async, p->extend_param.base_domain_id,
            p->extend_param.embed_flash, p->extend_param.enabled_cpus_num,
            p->extend_param.enabled_cpus_mask, p->extend_param.n_batch);
#if FAKE_ABI_MINOR == 2
    fputs(", \"img_start\": ", out);
    json_string(out, p->img_start);
    fputs(", \"img_end\": ", out);
    json_string(out, p->img_end);
    fputs(", \"img_content\": ", out);
    json_string(out, p->img_content);
#endif
    record_end(out);
}

/* ------------------------------------------------------- multimodal input (vision)
 * A MULTIMODAL run is recorded with what reached each struct field: the prompt, the
 * image counts and size, the image tags (1.3: in the input; 1.2: given at init), and
 * the embedding rows, read as n_image x n_image_tokens x HIDDEN_WIDTH floats (the
 * "model's" hidden size): the first three values of each row (up to
 * MM_RECORDED_ROWS rows per image) and the sum of all of them. */
#define MM_RECORDED_ROWS 64
#define IMAGE_MARKER "<image>"

static const char *multimodal_prompt(const RKLLMInput *in) {
    return in->multimodal_input.prompt ? in->multimodal_input.prompt : "";
}

#if FAKE_ABI_MINOR == 2
#define MM_IMAGE(in) (&(in)->multimodal_input)
#else
#define MM_IMAGE(in) (&(in)->multimodal_input.image)
#endif

static int count_markers(const char *prompt) {
    int found = 0;
    for (const char *at = strstr(prompt, IMAGE_MARKER); at; at = strstr(at + 1, IMAGE_MARKER))
        found++;
    return found;
}

static void record_multimodal(FILE *out, const RKLLMInput *in) {
    fputs(", \"multimodal\": {\"prompt\": ", out);
    json_string(out, in->multimodal_input.prompt);
    size_t n_image = MM_IMAGE(in)->n_image, n_tokens = MM_IMAGE(in)->n_image_tokens;
    fprintf(out, ", \"n_image\": %zu, \"n_image_tokens\": %zu, \"image_width\": %zu"
            ", \"image_height\": %zu", n_image, n_tokens, MM_IMAGE(in)->image_width,
            MM_IMAGE(in)->image_height);
#if FAKE_ABI_MINOR >= 3
    fputs(", \"image_start\": ", out);
    json_string(out, in->multimodal_input.image.image_start);
    fputs(", \"image_end\": ", out);
    json_string(out, in->multimodal_input.image.image_end);
    fputs(", \"image_content\": ", out);
    json_string(out, in->multimodal_input.image.image_content);
#endif
    const float *embed = MM_IMAGE(in)->image_embed;
    double sum = 0.0;
    fputs(", \"rows\": [", out);
    for (size_t i = 0; embed && i < n_image; i++) {
        fputs(i ? ", [" : "[", out);
        for (size_t t = 0; t < n_tokens; t++) {
            const float *row = embed + (i * n_tokens + t) * HIDDEN_WIDTH;
            for (int d = 0; d < HIDDEN_WIDTH; d++) sum += row[d];
            if (t < MM_RECORDED_ROWS)
                fprintf(out, "%s[%g, %g, %g]", t ? ", " : "", row[0], row[1], row[2]);
        }
        fputs("]", out);
    }
    fprintf(out, "], \"embed_sum\": %.6g, \"embed_present\": %s}", sum,
            embed ? "true" : "false");
}

static void record_run(const char *call, const RKLLMInput *in, const RKLLMInferParam *ip) {
    FILE *out = record_begin(call);
    if (out == NULL) return;
    fputs(", \"role\": ", out);
    json_string(out, in->role);
    fprintf(out, ", \"enable_thinking\": %s, \"input_type\": %d",
            in->enable_thinking ? "true" : "false", in->input_type);
    fputs(", \"prompt\": ", out);
    json_string(out, in->input_type == INPUT_PROMPT ? in->prompt_input : NULL);
    if (in->input_type == INPUT_MULTIMODAL) record_multimodal(out, in);
    if (in->input_type == INPUT_TOKEN) {   /* token input: the ids, in order */
        fputs(", \"tokens\": [", out);
        for (size_t i = 0; i < in->token_input.n_tokens; i++)
            fprintf(out, "%s%d", i ? ", " : "", (int)in->token_input.input_ids[i]);
        fputs("]", out);
    }
    if (ip == NULL) {
        fputs(", \"infer_params\": null", out);
        record_end(out);
        return;
    }
    fprintf(out, ", \"mode\": %d, \"keep_history\": %d", ip->mode, ip->keep_history);
    fputs(", \"lora_name\": ", out);
    json_string(out, ip->lora_params ? ip->lora_params->lora_adapter_name : NULL);
    fputs(", \"prompt_cache_path\": ", out);
    json_string(out, (ip->prompt_cache_params && ip->prompt_cache_params->save_prompt_cache)
                         ? ip->prompt_cache_params->prompt_cache_path : NULL);
#if FAKE_ABI_MINOR >= 3
    fprintf(out, ", \"max_new_tokens\": %d", ip->max_new_tokens);
    if (ip->sampling_params) {
        const RKLLMSamplingParam *sp = ip->sampling_params;
        fprintf(out,
                ", \"sampling\": {\"top_k\": %d, \"top_p\": %g, \"temperature\": %g"
                ", \"repeat_penalty\": %g, \"frequency_penalty\": %g"
                ", \"presence_penalty\": %g, \"mirostat\": %d, \"mirostat_tau\": %g"
                ", \"mirostat_eta\": %g}",
                sp->top_k, sp->top_p, sp->temperature, sp->repeat_penalty,
                sp->frequency_penalty, sp->presence_penalty, sp->mirostat,
                sp->mirostat_tau, sp->mirostat_eta);
    } else {
        fputs(", \"sampling\": null", out);
    }
#else
    fputs(", \"max_new_tokens\": null, \"sampling\": null", out);
#endif
    record_end(out);
}

/* ------------------------------------------------------------ the ABI */

RKLLMParam rkllm_createDefaultParam(void) {
    RKLLMParam p;
    memset(&p, 0, sizeof p);
    p.model_path = NULL;
    p.max_context_len = 512;
    p.max_new_tokens = -1;
    p.top_k = 1;
    p.n_keep = -1;
    p.top_p = 0.9f;
    p.temperature = 0.8f;
    p.repeat_penalty = 1.1f;
    p.frequency_penalty = 0.0f;
    p.presence_penalty = 0.0f;
    p.mirostat = 0;
    p.mirostat_tau = 5.0f;
    p.mirostat_eta = 0.1f;
    p.skip_special_token = false;
    p.is_async = false;
    p.extend_param.base_domain_id = 0;
    p.extend_param.embed_flash = 0;
    p.extend_param.enabled_cpus_num = 0;
    p.extend_param.n_batch = 1;
    return p;
}

/* True when the model file starts with `directive`: tests script init with it. */
static int model_file_says(const char *path, const char *directive) {
    char head[64] = {0};
    FILE *file = fopen(path, "rb");
    if (file == NULL) return 0;
    size_t got = fread(head, 1, sizeof head - 1, file);
    fclose(file);
    return got >= strlen(directive) && strncmp(head, directive, strlen(directive)) == 0;
}

/* The KIND of a model file starting with "@@init_crash:KIND@@". */
static const char *init_crash_kind(const char *path) {
    static char kind[16];
    char head[64] = {0};
    FILE *file = fopen(path, "rb");
    if (file == NULL) return "segv";
    size_t got = fread(head, 1, sizeof head - 1, file);
    fclose(file);
    head[got] = '\0';
    if (sscanf(head, "@@init_crash:%15[a-z]@@", kind) != 1) return "segv";
    return kind;
}

#if FAKE_ABI_MINOR == 2
int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback) {
    void *init_userdata = NULL;
#else
int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLMCallback *callbacks) {
    LLMResultCallback callback = callbacks ? callbacks->result_callback : NULL;
    void *init_userdata = callbacks ? callbacks->result_userdata : NULL;
#endif
    printf("I rkllm: rkllm-runtime version: %s, rknpu driver version: 0.9.8 (fake), "
           "platform: RK3588\n", FAKE_VERSION);
    fflush(stdout);
    if (handle == NULL || param == NULL || param->model_path == NULL || callback == NULL)
        return -1;
    record_init(param);
    struct stat model_file;
    if (stat(param->model_path, &model_file) != 0 || !S_ISREG(model_file.st_mode) ||
        model_file.st_size == 0) {
        /* missing, not a file, or empty: what a corrupt .rkllm looks like to the double */
        fprintf(stderr, "E rkllm: cannot load model file %s\n", param->model_path);
        return -1;
    }
    if (model_file_says(param->model_path, "@@init_crash:")) {
        const char *kind = init_crash_kind(param->model_path);
        crash_now(kind, strlen(kind));
    }
    if (model_file_says(param->model_path, "@@init_fail@@")) {
        /* a model the library refuses (built for another platform, say) */
        fprintf(stderr, "E rkllm: model %s is not supported\n", param->model_path);
        return -1;
    }
    FakeModel *model = calloc(1, sizeof *model);
    if (model == NULL) return -1;
    snprintf(model->model_path, sizeof model->model_path, "%s", param->model_path);
    model->param = *param;
    model->param.model_path = model->model_path;
    model->callback = callback;
    model->callback_userdata = init_userdata;
    model->loaded_cache_length = -1;
    *handle = model;
    return 0;
}

int rkllm_destroy(LLMHandle handle) {
    record_simple("destroy");
    if (handle == NULL) return -1;
    free(handle);
    return 0;
}

int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *adapter) {
    FILE *out = record_begin("load_lora");
    if (out) {
        fputs(", \"path\": ", out);
        json_string(out, adapter ? adapter->lora_adapter_path : NULL);
        fputs(", \"name\": ", out);
        json_string(out, adapter ? adapter->lora_adapter_name : NULL);
        fprintf(out, ", \"scale\": %g", adapter ? adapter->scale : 0.0f);
        record_end(out);
    }
    if (handle == NULL || adapter == NULL || adapter->lora_adapter_path == NULL) return -1;
    return access(adapter->lora_adapter_path, R_OK) == 0 ? 0 : -1;
}

int rkllm_load_prompt_cache(LLMHandle handle, const char *path) {
    FILE *out = record_begin("load_prompt_cache");
    if (out) {
        fputs(", \"path\": ", out);
        json_string(out, path);
        record_end(out);
    }
    FakeModel *model = handle;
    if (model == NULL || path == NULL) return -1;
    FILE *in = fopen(path, "r");
    if (in == NULL) return -1;
    int kv = -1;
    int ok = fscanf(in, "FAKE_RKLLM_PROMPT_CACHE kv=%d", &kv) == 1;
    fclose(in);
    if (!ok || kv < 0) return -1;
    model->kv_length = kv;
    model->loaded_cache_length = kv;
    return 0;
}

int rkllm_release_prompt_cache(LLMHandle handle) {
    record_simple("release_prompt_cache");
    FakeModel *model = handle;
    if (model == NULL) return -1;
    model->loaded_cache_length = -1;
    return 0;
}

int rkllm_abort(LLMHandle handle) {
    FakeModel *model = handle;
    if (model == NULL) return -1;
    atomic_store(&model->abort_requested, 1);
    record_simple("abort");
    return 0;
}

int rkllm_is_running(LLMHandle handle) {
    FakeModel *model = handle;
    int running = model ? atomic_load(&model->running) : 0;
#if FAKE_ABI_MINOR == 2
    return running ? 0 : 1; /* 1.2.x: 0 means "running" */
#else
    return running ? 1 : 0;
#endif
}

int rkllm_run(LLMHandle handle, RKLLMInput *input, RKLLMInferParam *infer, void *userdata) {
    FakeModel *model = handle;
    if (model == NULL || input == NULL || infer == NULL) return -1;
    record_run("run", input, infer);
    const char *prompt = input->input_type == INPUT_PROMPT && input->prompt_input
                             ? input->prompt_input : "";
    int image_tokens = 0;
    if (input->input_type == INPUT_MULTIMODAL) {
        prompt = multimodal_prompt(input);
        /* like a real runtime, a marker without an image (or the reverse) is refused */
        if ((size_t)count_markers(prompt) != MM_IMAGE(input)->n_image ||
            MM_IMAGE(input)->image_embed == NULL || MM_IMAGE(input)->n_image_tokens == 0) {
            fprintf(stderr, "E rkllm: %d image markers for %zu images\n",
                    count_markers(prompt), MM_IMAGE(input)->n_image);
            return -1;
        }
        image_tokens = (int)(MM_IMAGE(input)->n_image * MM_IMAGE(input)->n_image_tokens);
    }
    if (has_directive(prompt, "fail")) return -1;

    Stream s;
    memset(&s, 0, sizeof s);
    s.model = model;
    s.userdata = userdata ? userdata : model->callback_userdata;
    s.started_us = now_us();
    s.error_after = directive_int(prompt, "error", -1);
    s.slow_ms = directive_int(prompt, "slow", 0);
    s.split_at = directive_int(prompt, "split", 1);
    s.limit = model->param.max_new_tokens;
    s.crash_kind = find_directive(prompt, "crash", &s.crash_kind_len);
    s.crash_after = directive_int(prompt, "crash_after", 1);
#if FAKE_ABI_MINOR >= 3
    if (infer->max_new_tokens > 0) s.limit = infer->max_new_tokens;
#endif
    atomic_store(&model->abort_requested, 0);
    atomic_store(&model->running, 1);

    int prompt_words = count_words(prompt) + image_tokens;
    if (input->input_type == INPUT_TOKEN) prompt_words += (int)input->token_input.n_tokens;
    int prefill_delay = directive_int(prompt, "prefill", 0);
    if (prefill_delay > 0) sleep_ms(prefill_delay); /* like the real one, not abortable */
    long long prefill_end = now_us();
    if (infer->prompt_cache_params && infer->prompt_cache_params->save_prompt_cache &&
        infer->prompt_cache_params->prompt_cache_path)
        save_prompt_cache(infer->prompt_cache_params->prompt_cache_path,
                          model->kv_length + prompt_words);

    /* A hidden-layer or logits run fails like a generation: @@crash:KIND@@ dies
     * before any output, @@error:N@@ (any N) ends it in STATE_ERROR. */
    if ((infer->mode == MODE_LAST_HIDDEN || infer->mode == MODE_LOGITS) &&
        (s.crash_kind != NULL || s.error_after >= 0)) {
        if (s.crash_kind != NULL) crash_now(s.crash_kind, s.crash_kind_len);
        emit(&s, "scripted failure of the NPU double", STATE_ERROR);
        atomic_store(&model->running, 0);
        return 0;
    }
    if (infer->mode == MODE_LAST_HIDDEN) {
        run_embedding(&s, prompt);
        atomic_store(&model->running, 0);
        return 0;
    }
    if (infer->mode == MODE_LOGITS) {
        run_logits(&s, prompt);
        atomic_store(&model->running, 0);
        return 0;
    }

    size_t reply_len;
    const char *reply = find_directive(prompt, "reply", &reply_len);
    int count = directive_int(prompt, "count", -1);
    if (reply) stream_reply(&s, reply, reply_len);
    else if (count >= 0) stream_count(&s, count);
    else if (has_directive(prompt, "hang")) stream_hang(&s);
    else stream_default(&s);
    if (s.crash_kind != NULL) crash_now(s.crash_kind, s.crash_kind_len); /* a short answer */

    if (s.error_after >= 0 && s.tokens >= s.error_after && !atomic_load(&model->abort_requested)) {
        emit(&s, "scripted failure of the NPU double", STATE_ERROR);
    } else {
        fill_perf(&s, prompt_words, prefill_end);
        emit(&s, NULL, STATE_FINISH);
        if (infer->keep_history) model->kv_length += prompt_words + s.tokens;
    }
    atomic_store(&model->running, 0);
    return 0;
}

/* The double runs asynchronous requests synchronously: the callbacks are the same. */
int rkllm_run_async(LLMHandle handle, RKLLMInput *input, RKLLMInferParam *infer, void *userdata) {
    return rkllm_run(handle, input, infer, userdata);
}

int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos) {
    FILE *out = record_begin("clear_kv_cache");
    if (out) {
        fprintf(out, ", \"keep_system_prompt\": %d, \"ranges\": %s", keep_system_prompt,
                (start_pos || end_pos) ? "true" : "false");
        if (start_pos && end_pos)
            fprintf(out, ", \"start_pos\": %d, \"end_pos\": %d", *start_pos, *end_pos);
        record_end(out);
    }
    FakeModel *model = handle;
    if (model == NULL) return -1;
    if (start_pos && end_pos) {   /* positions [start, end) go, the rest moves up */
        int start = *start_pos, end = *end_pos;
        if (start < 0 || end < start) return -1;
        if (start < model->kv_length)
            model->kv_length = start + (end < model->kv_length ? model->kv_length - end : 0);
        return 0;
    }
    model->kv_length = 0;
    return 0;
}

int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes) {
    FakeModel *model = handle;
    if (model == NULL || cache_sizes == NULL) return -1;
    cache_sizes[0] = model->kv_length;
    return 0;
}

static int record_strings3(const char *call, const char *a_name, const char *a,
                           const char *b_name, const char *b, const char *c_name,
                           const char *c) {
    FILE *out = record_begin(call);
    if (out) {
        fprintf(out, ", \"%s\": ", a_name);
        json_string(out, a);
        fprintf(out, ", \"%s\": ", b_name);
        json_string(out, b);
        fprintf(out, ", \"%s\": ", c_name);
        json_string(out, c);
        record_end(out);
    }
    return 0;
}

int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt,
                            const char *prompt_prefix, const char *prompt_postfix) {
    record_strings3("set_chat_template", "system_prompt", system_prompt, "prompt_prefix",
                    prompt_prefix, "prompt_postfix", prompt_postfix);
    FakeModel *model = handle;
    if (model == NULL) return -1;
    model->kv_length = 0; /* the real runtime clears the KV cache here too */
    /* A system part holding @@template_fail@@ is refused (after the clear). */
    if (system_prompt != NULL && strstr(system_prompt, "@@template_fail@@") != NULL) return -1;
    return 0;
}

int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt, const char *tools,
                             const char *tool_response_str) {
    record_strings3("set_function_tools", "system_prompt", system_prompt, "tools", tools,
                    "tool_response_str", tool_response_str);
    return handle ? 0 : -1;
}

int rkllm_set_cross_attn_params(LLMHandle handle, void *cross_attn_params) {
    record_simple("set_cross_attn_params");
    return (handle && cross_attn_params) ? 0 : -1;
}

/* ------------------------------------------------------------ layout report */

#define OPEN(S) used += snprintf(buf + used, room(n, used), "%s\"" #S "\": {\"size\": %zu, \"offsets\": {", first_struct ? "" : ", ", sizeof(S)); first_struct = 0; first_field = 1
#define FIELD(S, f) used += snprintf(buf + used, room(n, used), "%s\"" #f "\": %zu", first_field ? "" : ", ", offsetof(S, f)); first_field = 0
#define CLOSE() used += snprintf(buf + used, room(n, used), "}}")

static size_t room(int n, int used) { return used < n ? (size_t)(n - used) : 0; }

/* Writes {"abi": "1.x.y", "<struct>": {"size": N, "offsets": {...}}, ...} into buf;
 * returns the length needed (like snprintf), so a caller can retry larger. */
int fake_rkllm_layout(char *buf, int n) {
    int used = 0, first_struct = 1, first_field = 1;
    used += snprintf(buf, room(n, used), "{\"abi\": \"%s\", \"structs\": {", FAKE_VERSION);
    OPEN(RKLLMExtendParam);
    FIELD(RKLLMExtendParam, base_domain_id); FIELD(RKLLMExtendParam, embed_flash);
    FIELD(RKLLMExtendParam, enabled_cpus_num); FIELD(RKLLMExtendParam, enabled_cpus_mask);
    FIELD(RKLLMExtendParam, n_batch); FIELD(RKLLMExtendParam, use_cross_attn);
    FIELD(RKLLMExtendParam, reserved);
    CLOSE();
    OPEN(RKLLMParam);
    FIELD(RKLLMParam, model_path); FIELD(RKLLMParam, max_context_len);
    FIELD(RKLLMParam, max_new_tokens); FIELD(RKLLMParam, top_k); FIELD(RKLLMParam, n_keep);
    FIELD(RKLLMParam, top_p); FIELD(RKLLMParam, temperature);
    FIELD(RKLLMParam, repeat_penalty); FIELD(RKLLMParam, frequency_penalty);
    FIELD(RKLLMParam, presence_penalty); FIELD(RKLLMParam, mirostat);
    FIELD(RKLLMParam, mirostat_tau); FIELD(RKLLMParam, mirostat_eta);
    FIELD(RKLLMParam, skip_special_token); FIELD(RKLLMParam, is_async);
#if FAKE_ABI_MINOR == 2
    FIELD(RKLLMParam, img_start); FIELD(RKLLMParam, img_end); FIELD(RKLLMParam, img_content);
#else
    FIELD(RKLLMParam, ignore_eos_token);
#endif
    FIELD(RKLLMParam, extend_param);
    CLOSE();
    OPEN(RKLLMLoraAdapter);
    FIELD(RKLLMLoraAdapter, lora_adapter_path); FIELD(RKLLMLoraAdapter, lora_adapter_name);
    FIELD(RKLLMLoraAdapter, scale);
    CLOSE();
    OPEN(RKLLMEmbedInput); FIELD(RKLLMEmbedInput, embed); FIELD(RKLLMEmbedInput, n_tokens); CLOSE();
    OPEN(RKLLMTokenInput); FIELD(RKLLMTokenInput, input_ids); FIELD(RKLLMTokenInput, n_tokens); CLOSE();
    OPEN(RKLLMMultiModalInput);
    FIELD(RKLLMMultiModalInput, prompt);
#if FAKE_ABI_MINOR == 2
    FIELD(RKLLMMultiModalInput, image_embed); FIELD(RKLLMMultiModalInput, n_image_tokens);
    FIELD(RKLLMMultiModalInput, n_image); FIELD(RKLLMMultiModalInput, image_width);
    FIELD(RKLLMMultiModalInput, image_height);
#else
    FIELD(RKLLMMultiModalInput, image); FIELD(RKLLMMultiModalInput, video);
    FIELD(RKLLMMultiModalInput, image.image_embed); FIELD(RKLLMMultiModalInput, image.n_image_tokens);
    FIELD(RKLLMMultiModalInput, image.n_image); FIELD(RKLLMMultiModalInput, image.image_start);
    FIELD(RKLLMMultiModalInput, image.image_end); FIELD(RKLLMMultiModalInput, image.image_content);
    FIELD(RKLLMMultiModalInput, image.image_width); FIELD(RKLLMMultiModalInput, image.image_height);
    FIELD(RKLLMMultiModalInput, video.video_embed); FIELD(RKLLMMultiModalInput, video.n_frame_tokens);
    FIELD(RKLLMMultiModalInput, video.n_frame_per_video); FIELD(RKLLMMultiModalInput, video.n_video);
    FIELD(RKLLMMultiModalInput, video.video_start); FIELD(RKLLMMultiModalInput, video.video_end);
    FIELD(RKLLMMultiModalInput, video.video_content); FIELD(RKLLMMultiModalInput, video.frame_width);
    FIELD(RKLLMMultiModalInput, video.frame_height);
#endif
    CLOSE();
    OPEN(RKLLMInput);
    FIELD(RKLLMInput, role); FIELD(RKLLMInput, enable_thinking); FIELD(RKLLMInput, input_type);
    FIELD(RKLLMInput, prompt_input); FIELD(RKLLMInput, embed_input);
    FIELD(RKLLMInput, token_input); FIELD(RKLLMInput, multimodal_input);
    CLOSE();
    OPEN(RKLLMLoraParam); FIELD(RKLLMLoraParam, lora_adapter_name); CLOSE();
    OPEN(RKLLMPromptCacheParam);
    FIELD(RKLLMPromptCacheParam, save_prompt_cache); FIELD(RKLLMPromptCacheParam, prompt_cache_path);
    CLOSE();
#if FAKE_ABI_MINOR >= 3
    OPEN(RKLLMSamplingParam);
    FIELD(RKLLMSamplingParam, top_k); FIELD(RKLLMSamplingParam, top_p);
    FIELD(RKLLMSamplingParam, temperature); FIELD(RKLLMSamplingParam, repeat_penalty);
    FIELD(RKLLMSamplingParam, frequency_penalty); FIELD(RKLLMSamplingParam, presence_penalty);
    FIELD(RKLLMSamplingParam, mirostat); FIELD(RKLLMSamplingParam, mirostat_tau);
    FIELD(RKLLMSamplingParam, mirostat_eta);
    CLOSE();
    OPEN(RKLLMCallback);
    FIELD(RKLLMCallback, result_callback); FIELD(RKLLMCallback, result_userdata);
    FIELD(RKLLMCallback, tokenizer_callback); FIELD(RKLLMCallback, tokenizer_userdata);
    FIELD(RKLLMCallback, embed_callback); FIELD(RKLLMCallback, embed_userdata);
    CLOSE();
#endif
    OPEN(RKLLMInferParam);
    FIELD(RKLLMInferParam, mode); FIELD(RKLLMInferParam, lora_params);
    FIELD(RKLLMInferParam, prompt_cache_params); FIELD(RKLLMInferParam, keep_history);
#if FAKE_ABI_MINOR >= 3
    FIELD(RKLLMInferParam, sampling_params); FIELD(RKLLMInferParam, max_new_tokens);
#endif
    CLOSE();
    OPEN(RKLLMResultLastHiddenLayer);
    FIELD(RKLLMResultLastHiddenLayer, hidden_states); FIELD(RKLLMResultLastHiddenLayer, embd_size);
    FIELD(RKLLMResultLastHiddenLayer, num_tokens);
    CLOSE();
    OPEN(RKLLMResultLogits);
    FIELD(RKLLMResultLogits, logits); FIELD(RKLLMResultLogits, vocab_size);
    FIELD(RKLLMResultLogits, num_tokens);
    CLOSE();
    OPEN(RKLLMPerfStat);
    FIELD(RKLLMPerfStat, prefill_time_ms); FIELD(RKLLMPerfStat, prefill_tokens);
    FIELD(RKLLMPerfStat, generate_time_ms); FIELD(RKLLMPerfStat, generate_tokens);
    FIELD(RKLLMPerfStat, memory_usage_mb);
    CLOSE();
    OPEN(RKLLMResult);
    FIELD(RKLLMResult, text); FIELD(RKLLMResult, token_id); FIELD(RKLLMResult, last_hidden_layer);
    FIELD(RKLLMResult, logits); FIELD(RKLLMResult, perf);
    CLOSE();
    used += snprintf(buf + used, room(n, used), "}}");
    return used;
}
