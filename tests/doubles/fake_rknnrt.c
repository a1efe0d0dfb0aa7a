/*
 * A test double of librknnrt.so, the Rockchip NPU runtime for .rknn models, limited
 * to what a vision encoder uses: init, core mask, query, inputs_set, run,
 * outputs_get, outputs_release, destroy.
 *
 *     cc -shared -fPIC -pthread -o librknnrt.so fake_rknnrt.c
 *
 * The "model" is a text file whose first line describes the encoder:
 *
 *     FAKE-RKNN h=64 w=64 c=3 layout=NHWC type=uint8 out=16x8 cores=3 fail=run:-3
 *
 *   h, w, c     image input size (default 448 x 448 x 3)
 *   layout      NHWC or NCHW: the format rknn_query reports for the input
 *               (NC1HWC2 is reported too, with NCHW dims, for refusal tests)
 *   type        uint8, int8, float16 or float32: the input type it reports
 *   out         the output's dims, e.g. 256x64 or 1x256x64; the last one is the
 *               embedding width D, the product of the others the token count T,
 *               which must be a square (g x g patches)
 *   cores       NPU cores the "board" has (default 3): core masks beyond fail
 *   crash=run         die with SIGSEGV inside rknn_run (the encoder's process ends)
 *   fail=CALL[:CODE]  make CALL (init, set_core_mask, query, inputs_set, run,
 *               outputs_get, outputs_release, destroy) return CODE (default -1);
 *               FAKE_RKNN_FAIL="run:-3,query" does the same at call time
 *
 * rknn_run computes the output from the image it received: the image is cut into
 * a g x g grid of patches, and token t = row * g + col holds, in its first c
 * values, the mean of each channel over that patch (in the numbers the caller
 * sent: 0-255 for uint8, the float values for float32); the remaining values are
 * 0. So a test can tell from the output which image, padded and resized how,
 * reached the encoder. The input is read in the type and layout the caller's
 * rknn_input names (the real runtime converts from those with pass_through=0).
 *
 * Outputs are float32 only (want_float=1); the output attribute reports float16,
 * as a float16 encoder would. Every call is appended as one JSON line to the file
 * named by FAKE_RKNN_RECORD; fake_rknn_layout() reports the struct layouts.
 *
 * The declarations below are written from the project's ABI notes; they are not
 * the SDK header.
 */
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stddef.h>

/* ------------------------------------------------------------------ types */

#define MAX_DIMS 16
#define MAX_NAME 256
#define MAX_CONTEXTS 64
#define MAX_HEADER 1024

typedef uint64_t rknn_context;

enum { QUERY_IN_OUT_NUM = 0, QUERY_INPUT_ATTR = 1, QUERY_OUTPUT_ATTR = 2 };
enum { FMT_NCHW = 0, FMT_NHWC = 1, FMT_NC1HWC2 = 2 };
enum { TYPE_FLOAT32 = 0, TYPE_FLOAT16 = 1, TYPE_INT8 = 2, TYPE_UINT8 = 3 };

typedef struct {
    uint32_t n_input;
    uint32_t n_output;
} rknn_input_output_num;

typedef struct {
    uint32_t index;
    uint32_t n_dims;
    uint32_t dims[MAX_DIMS];
    char name[MAX_NAME];
    uint32_t n_elems;
    uint32_t size;
    int fmt;
    int type;
    int qnt_type;
    int8_t fl;
    int32_t zp;
    float scale;
    uint32_t w_stride;
    uint32_t size_with_stride;
    uint8_t pass_through;
    uint32_t h_stride;
} rknn_tensor_attr;

typedef struct {
    uint32_t index;
    void *buf;
    uint32_t size;
    uint8_t pass_through;
    int type;
    int fmt;
} rknn_input;

typedef struct {
    uint8_t want_float;
    uint8_t is_prealloc;
    uint32_t index;
    void *buf;
    uint32_t size;
} rknn_output;

typedef struct {
    char header[MAX_HEADER];
    int h, w, c, layout, type, cores;
    uint32_t out_dims[MAX_DIMS];
    uint32_t out_n_dims;
    size_t tokens, width, grid;
    float *image;    /* the received input as float, h x w x c */
    int has_image;
    float *output;   /* tokens x width, computed by rknn_run */
    int has_output;
    void *lent[8];   /* output buffers handed out and not yet released */
} FakeModel;

/* --------------------------------------------------------------- recording */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static FakeModel *live[MAX_CONTEXTS]; /* so a stale or foreign context fails, not crashes */

/* text as a JSON string (quotes included) in out, cut to fit; returns out. */
static char *json_string(const char *text, char *out, size_t room) {
    size_t n = 0;
    out[n++] = '"';
    for (const unsigned char *p = (const unsigned char *)text; *p && n + 8 < room; p++) {
        if (*p == '"' || *p == '\\') n += (size_t)snprintf(out + n, room - n, "\\%c", *p);
        else if (*p < 0x20) n += (size_t)snprintf(out + n, room - n, "\\u%04x", *p);
        else out[n++] = (char)*p;
    }
    out[n++] = '"';
    out[n] = '\0';
    return out;
}

/* One JSON line: {"call": ..., "status": ..., <fields>}; fields is a printf format
 * producing `, "key": value` pairs. */
__attribute__((format(printf, 3, 4)))
static void record(const char *call, int status, const char *fields, ...) {
    const char *path = getenv("FAKE_RKNN_RECORD");
    if (path == NULL || *path == '\0') return;
    FILE *out = fopen(path, "a");
    if (out == NULL) return;
    fprintf(out, "{\"call\": \"%s\", \"status\": %d", call, status);
    va_list args;
    va_start(args, fields);
    vfprintf(out, fields, args);
    va_end(args);
    fputs("}\n", out);
    fclose(out);
}

/* ---------------------------------------------------------- scripted failures */

/* The code `call` must fail with according to `spec` ("run:-3,query"), or 0. */
static int failure_in(const char *spec, const char *call) {
    if (spec == NULL) return 0;
    size_t n = strlen(call);
    for (const char *p = spec; (p = strstr(p, call)) != NULL; p += n) {
        int starts = p == spec || p[-1] == ',' || p[-1] == '=' || p[-1] == ' ';
        if (!starts || (p[n] != '\0' && p[n] != ':' && p[n] != ',' && p[n] != ' ')) continue;
        return p[n] == ':' ? atoi(p + n + 1) : -1;
    }
    return 0;
}

/* Header directives first (fail=run:-3 ...), then the environment. */
static int scripted(const FakeModel *model, const char *call) {
    if (model != NULL) {
        for (const char *p = model->header; (p = strstr(p, "fail=")) != NULL; p += 5) {
            char one[64];
            sscanf(p + 5, "%63s", one);
            int code = failure_in(one, call);
            if (code) return code;
        }
    }
    return failure_in(getenv("FAKE_RKNN_FAIL"), call);
}

/* ---------------------------------------------------------------- the model */

static const char *word_after(const char *header, const char *key) {
    const char *p = header;
    size_t n = strlen(key);
    while ((p = strstr(p, key)) != NULL) {
        if (p == header || p[-1] == ' ') return p + n;
        p += n;
    }
    return NULL;
}

static int parse_type(const char *v) {
    if (v == NULL || strncmp(v, "uint8", 5) == 0) return TYPE_UINT8;
    if (strncmp(v, "int8", 4) == 0) return TYPE_INT8;
    if (strncmp(v, "float16", 7) == 0) return TYPE_FLOAT16;
    if (strncmp(v, "float32", 7) == 0) return TYPE_FLOAT32;
    return -1;
}

static int parse_out(FakeModel *m, const char *v) {
    if (v == NULL) v = "256x64";
    m->out_n_dims = 0;
    while (m->out_n_dims < MAX_DIMS) {
        char *end;
        unsigned long d = strtoul(v, &end, 10);
        if (end == v || d == 0) return -1;
        m->out_dims[m->out_n_dims++] = (uint32_t)d;
        if (*end != 'x') break;
        v = end + 1;
    }
    m->width = m->out_dims[m->out_n_dims - 1];
    m->tokens = 1;
    for (uint32_t i = 0; i + 1 < m->out_n_dims; i++) m->tokens *= m->out_dims[i];
    m->grid = 1;
    while ((m->grid + 1) * (m->grid + 1) <= m->tokens) m->grid++;
    return m->grid * m->grid == m->tokens ? 0 : -1;
}

static int int_after(const char *header, const char *key, int fallback) {
    const char *v = word_after(header, key);
    return v ? atoi(v) : fallback;
}

/* Reads the header line into a new model, or returns NULL for an invalid model. */
static FakeModel *parse_model(const char *data, size_t size) {
    if (size < 9 || memcmp(data, "FAKE-RKNN", 9) != 0) return NULL;
    FakeModel *m = calloc(1, sizeof *m);
    size_t n = 0;
    while (n < size && n < MAX_HEADER - 1 && data[n] != '\n') n++;
    memcpy(m->header, data, n);
    m->h = int_after(m->header, "h=", 448);
    m->w = int_after(m->header, "w=", 448);
    m->c = int_after(m->header, "c=", 3);
    m->cores = int_after(m->header, "cores=", 3);
    const char *layout = word_after(m->header, "layout=");
    m->layout = layout == NULL ? FMT_NHWC
                : strncmp(layout, "NCHW", 4) == 0 ? FMT_NCHW
                : strncmp(layout, "NC1HWC2", 7) == 0 ? FMT_NC1HWC2 : FMT_NHWC;
    m->type = parse_type(word_after(m->header, "type="));
    int ok = m->h > 0 && m->w > 0 && m->c > 0 && m->type >= 0
             && parse_out(m, word_after(m->header, "out=")) == 0
             && m->grid <= (size_t)m->h && m->grid <= (size_t)m->w
             && m->width >= (size_t)m->c;
    if (!ok) {
        free(m);
        return NULL;
    }
    return m;
}

static char *read_file(const char *path, size_t *size) {
    FILE *in = fopen(path, "rb");
    if (in == NULL) return NULL;
    char *data = calloc(1, MAX_HEADER);
    *size = fread(data, 1, MAX_HEADER, in);
    fclose(in);
    return data;
}

static FakeModel *lookup(rknn_context ctx) {
    FakeModel *found = NULL;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_CONTEXTS; i++)
        if (live[i] != NULL && (rknn_context)(uintptr_t)live[i] == ctx) found = live[i];
    pthread_mutex_unlock(&lock);
    return found;
}

static int remember(FakeModel *m) {
    int slot = -1;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_CONTEXTS && slot < 0; i++)
        if (live[i] == NULL) live[slot = i] = m;
    pthread_mutex_unlock(&lock);
    return slot;
}

static void forget(FakeModel *m) {
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_CONTEXTS; i++)
        if (live[i] == m) live[i] = NULL;
    pthread_mutex_unlock(&lock);
}

static int outstanding(const FakeModel *m) {
    int n = 0;
    for (int i = 0; i < 8; i++) n += m->lent[i] != NULL;
    return n;
}

/* ----------------------------------------------------------------- the API */

int rknn_init(rknn_context *context, void *model, uint32_t size, uint32_t flag, void *extend) {
    size_t length = size;
    char *from_path = NULL;
    if (size == 0 && model != NULL) from_path = read_file((const char *)model, &length);
    const char *data = from_path ? from_path : (const char *)model;
    FakeModel *m = (context && data) ? parse_model(data, length) : NULL;
    free(from_path);
    int status = m ? scripted(m, "init") : -1;
    if (status == 0 && remember(m) < 0) status = -1; /* too many live contexts */
    char header[2 * MAX_HEADER + 16];
    json_string(m ? m->header : "", header, sizeof header);
    if (status != 0) free(m);
    else *context = (rknn_context)(uintptr_t)m;
    record("init", status, ", \"size\": %u, \"flag\": %u, \"from_path\": %s, "
           "\"extend_null\": %s, \"header\": %s", size, flag, size == 0 ? "true" : "false",
           extend == NULL ? "true" : "false", header);
    return status;
}

int rknn_set_core_mask(rknn_context context, int mask) {
    FakeModel *m = lookup(context);
    int valid = mask == 0 || mask == 1 || mask == 2 || mask == 4 || mask == 3 || mask == 7;
    int status = (m == NULL || !valid) ? -1 : scripted(m, "set_core_mask");
    if (status == 0 && m->cores < 3 && (mask & ~((1 << m->cores) - 1))) status = -1;
    record("set_core_mask", status, ", \"mask\": %d", mask);
    return status;
}

static void fill_input_attr(const FakeModel *m, rknn_tensor_attr *a) {
    uint32_t index = a->index;
    memset(a, 0, sizeof *a);
    a->index = index;
    a->n_dims = 4;
    uint32_t nhwc[4] = {1, (uint32_t)m->h, (uint32_t)m->w, (uint32_t)m->c};
    uint32_t nchw[4] = {1, (uint32_t)m->c, (uint32_t)m->h, (uint32_t)m->w};
    memcpy(a->dims, m->layout == FMT_NHWC ? nhwc : nchw, sizeof nhwc);
    snprintf(a->name, MAX_NAME, "pixel_values");
    a->n_elems = (uint32_t)(m->h * m->w * m->c);
    int bytes = m->type == TYPE_FLOAT32 ? 4 : m->type == TYPE_FLOAT16 ? 2 : 1;
    a->size = a->n_elems * bytes;
    a->fmt = m->layout;
    a->type = m->type;
    a->scale = 1.0f;
    a->w_stride = (uint32_t)m->w;
    a->size_with_stride = a->size;
    a->h_stride = (uint32_t)m->h;
}

static void fill_output_attr(const FakeModel *m, rknn_tensor_attr *a) {
    uint32_t index = a->index;
    memset(a, 0, sizeof *a);
    a->index = index;
    a->n_dims = m->out_n_dims;
    memcpy(a->dims, m->out_dims, sizeof m->out_dims);
    snprintf(a->name, MAX_NAME, "image_embeds");
    a->n_elems = (uint32_t)(m->tokens * m->width);
    a->size = a->n_elems * 2;
    a->fmt = FMT_NCHW;
    a->type = TYPE_FLOAT16;
    a->scale = 1.0f;
    a->size_with_stride = a->size;
}

int rknn_query(rknn_context context, int cmd, void *info, uint32_t size) {
    FakeModel *m = lookup(context);
    int status = (m == NULL || info == NULL) ? -1 : scripted(m, "query");
    int index = -1;
    if (status == 0 && cmd == QUERY_IN_OUT_NUM && size == sizeof(rknn_input_output_num)) {
        rknn_input_output_num *num = info;
        num->n_input = 1;
        num->n_output = 1;
    } else if (status == 0 && (cmd == QUERY_INPUT_ATTR || cmd == QUERY_OUTPUT_ATTR)
               && size == sizeof(rknn_tensor_attr) && ((rknn_tensor_attr *)info)->index == 0) {
        index = 0;
        if (cmd == QUERY_INPUT_ATTR) fill_input_attr(m, info);
        else fill_output_attr(m, info);
    } else if (status == 0) {
        status = -1; /* unknown command, wrong struct size or no such tensor */
    }
    record("query", status, ", \"cmd\": %d, \"size\": %u, \"index\": %d", cmd, size, index);
    return status;
}

/* The caller's buffer as float h x w x c, read in the type and layout it names. */
static int take_image(FakeModel *m, const rknn_input *in) {
    size_t n = (size_t)m->h * m->w * m->c;
    size_t bytes = in->type == TYPE_FLOAT32 ? 4 : 1;
    if (in->index != 0 || in->buf == NULL || in->pass_through != 0 || in->size != n * bytes
        || (in->fmt != FMT_NHWC && in->fmt != FMT_NCHW)
        || (in->type != TYPE_FLOAT32 && in->type != TYPE_UINT8 && in->type != TYPE_INT8))
        return -1;
    if (m->image == NULL) m->image = malloc(n * sizeof(float));
    for (int y = 0; y < m->h; y++)
        for (int x = 0; x < m->w; x++)
            for (int ch = 0; ch < m->c; ch++) {
                size_t from = in->fmt == FMT_NHWC ? ((size_t)y * m->w + x) * m->c + ch
                                                  : ((size_t)ch * m->h + y) * m->w + x;
                float v = in->type == TYPE_FLOAT32 ? ((const float *)in->buf)[from]
                          : in->type == TYPE_UINT8 ? ((const uint8_t *)in->buf)[from]
                                                   : ((const int8_t *)in->buf)[from];
                m->image[((size_t)y * m->w + x) * m->c + ch] = v;
            }
    m->has_image = 1;
    m->has_output = 0;
    return 0;
}

int rknn_inputs_set(rknn_context context, uint32_t n_inputs, rknn_input inputs[]) {
    FakeModel *m = lookup(context);
    int status = (m == NULL || inputs == NULL || n_inputs != 1) ? -1 : scripted(m, "inputs_set");
    if (status == 0) status = take_image(m, &inputs[0]);
    double sum = 0;
    if (status == 0)
        for (size_t i = 0; i < (size_t)m->h * m->w * m->c; i++) sum += m->image[i];
    record("inputs_set", status, ", \"n\": %u, \"index\": %d, \"size\": %d, \"type\": %d, "
           "\"fmt\": %d, \"pass_through\": %d, \"sum\": %.3f", n_inputs,
           inputs ? (int)inputs[0].index : -1, inputs ? (int)inputs[0].size : -1,
           inputs ? inputs[0].type : -1, inputs ? inputs[0].fmt : -1,
           inputs ? inputs[0].pass_through : -1, sum);
    return status;
}

/* Token t = row * g + col: the per-channel means of that patch, then zeros. */
static void embed_patches(FakeModel *m) {
    if (m->output == NULL) m->output = malloc(m->tokens * m->width * sizeof(float));
    memset(m->output, 0, m->tokens * m->width * sizeof(float));
    size_t g = m->grid;
    for (size_t t = 0; t < m->tokens; t++) {
        size_t y0 = (t / g) * m->h / g, y1 = (t / g + 1) * m->h / g;
        size_t x0 = (t % g) * m->w / g, x1 = (t % g + 1) * m->w / g;
        for (int ch = 0; ch < m->c; ch++) {
            double sum = 0;
            for (size_t y = y0; y < y1; y++)
                for (size_t x = x0; x < x1; x++) sum += m->image[(y * m->w + x) * m->c + ch];
            m->output[t * m->width + ch] = (float)(sum / (double)((y1 - y0) * (x1 - x0)));
        }
    }
}

int rknn_run(rknn_context context, void *extend) {
    FakeModel *m = lookup(context);
    if (m != NULL && word_after(m->header, "crash=run") != NULL) {
        record("run", 0, ", \"crash\": true");
        raise(SIGSEGV);
    }
    int status = (m == NULL || !m->has_image) ? -1 : scripted(m, "run");
    if (status == 0) {
        embed_patches(m);
        m->has_output = 1;
    }
    record("run", status, ", \"extend_null\": %s", extend == NULL ? "true" : "false");
    return status;
}

int rknn_outputs_get(rknn_context context, uint32_t n_outputs, rknn_output outputs[],
                     void *extend) {
    FakeModel *m = lookup(context);
    int status = (m == NULL || outputs == NULL || n_outputs != 1 || !m->has_output)
                     ? -1 : scripted(m, "outputs_get");
    /* float32 only: a caller that does not ask for floats would get float16 bits */
    if (status == 0 && (outputs[0].index != 0 || outputs[0].want_float != 1)) status = -1;
    size_t bytes = status == 0 ? m->tokens * m->width * sizeof(float) : 0;
    if (status == 0 && outputs[0].is_prealloc) {
        if (outputs[0].buf == NULL || outputs[0].size < bytes) status = -1;
        else memcpy(outputs[0].buf, m->output, bytes);
    } else if (status == 0) {
        int slot = 0;
        while (slot < 8 && m->lent[slot] != NULL) slot++;
        if (slot == 8) {
            status = -1;
        } else {
            m->lent[slot] = malloc(bytes);
            memcpy(m->lent[slot], m->output, bytes);
            outputs[0].buf = m->lent[slot];
            outputs[0].size = (uint32_t)bytes;
        }
    }
    record("outputs_get", status, ", \"n\": %u, \"index\": %d, \"want_float\": %d, "
           "\"is_prealloc\": %d, \"extend_null\": %s", n_outputs,
           outputs ? (int)outputs[0].index : -1, outputs ? outputs[0].want_float : -1,
           outputs ? outputs[0].is_prealloc : -1, extend == NULL ? "true" : "false");
    return status;
}

int rknn_outputs_release(rknn_context context, uint32_t n_outputs, rknn_output outputs[]) {
    FakeModel *m = lookup(context);
    int status = (m == NULL || outputs == NULL) ? -1 : scripted(m, "outputs_release");
    int freed = 0;
    for (uint32_t i = 0; status == 0 && i < n_outputs; i++) {
        if (outputs[i].is_prealloc || outputs[i].buf == NULL) continue;
        for (int slot = 0; slot < 8; slot++)
            if (m->lent[slot] == outputs[i].buf) {
                free(m->lent[slot]);
                m->lent[slot] = NULL;
                freed++;
            }
    }
    record("outputs_release", status, ", \"n\": %u, \"freed\": %d, \"outstanding\": %d",
           n_outputs, freed, m ? outstanding(m) : -1);
    return status;
}

int rknn_destroy(rknn_context context) {
    FakeModel *m = lookup(context);
    int status = m == NULL ? -1 : scripted(m, "destroy");
    int left = m ? outstanding(m) : -1;
    if (m != NULL) { /* destroyed even when a failure is scripted: the handle is gone */
        forget(m);
        for (int i = 0; i < 8; i++) free(m->lent[i]);
        free(m->image);
        free(m->output);
        free(m);
    }
    record("destroy", status, ", \"outstanding\": %d", left);
    return status;
}

/* ------------------------------------------------------------ layout report */

#define OPEN(S) used += snprintf(buf + used, room(n, used), "%s\"" #S "\": {\"size\": %zu, \"offsets\": {", first_struct ? "" : ", ", sizeof(S)); first_struct = 0; first_field = 1
#define FIELD(S, f) used += snprintf(buf + used, room(n, used), "%s\"" #f "\": %zu", first_field ? "" : ", ", offsetof(S, f)); first_field = 0
#define CLOSE() used += snprintf(buf + used, room(n, used), "}}")

static size_t room(int n, int used) { return used < n ? (size_t)(n - used) : 0; }

/* Writes {"library": "fake-rknnrt", "structs": {"<struct>": {"size": N, "offsets":
 * {...}}, ...}} into buf; returns the length needed (like snprintf). */
int fake_rknn_layout(char *buf, int n) {
    int used = 0, first_struct = 1, first_field = 1;
    used += snprintf(buf, room(n, used), "{\"library\": \"fake-rknnrt\", \"structs\": {");
    OPEN(rknn_input_output_num);
    FIELD(rknn_input_output_num, n_input); FIELD(rknn_input_output_num, n_output);
    CLOSE();
    OPEN(rknn_tensor_attr);
    FIELD(rknn_tensor_attr, index); FIELD(rknn_tensor_attr, n_dims);
    FIELD(rknn_tensor_attr, dims); FIELD(rknn_tensor_attr, name);
    FIELD(rknn_tensor_attr, n_elems); FIELD(rknn_tensor_attr, size);
    FIELD(rknn_tensor_attr, fmt); FIELD(rknn_tensor_attr, type);
    FIELD(rknn_tensor_attr, qnt_type); FIELD(rknn_tensor_attr, fl);
    FIELD(rknn_tensor_attr, zp); FIELD(rknn_tensor_attr, scale);
    FIELD(rknn_tensor_attr, w_stride); FIELD(rknn_tensor_attr, size_with_stride);
    FIELD(rknn_tensor_attr, pass_through); FIELD(rknn_tensor_attr, h_stride);
    CLOSE();
    OPEN(rknn_input);
    FIELD(rknn_input, index); FIELD(rknn_input, buf); FIELD(rknn_input, size);
    FIELD(rknn_input, pass_through); FIELD(rknn_input, type); FIELD(rknn_input, fmt);
    CLOSE();
    OPEN(rknn_output);
    FIELD(rknn_output, want_float); FIELD(rknn_output, is_prealloc);
    FIELD(rknn_output, index); FIELD(rknn_output, buf); FIELD(rknn_output, size);
    CLOSE();
    used += snprintf(buf + used, room(n, used), "}}");
    return used;
}
