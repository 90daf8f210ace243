/* The CPU path's fused kernel: IoU -> max-IoU matching -> encoding, streaming over anchors.
 *
 * Built and loaded by tritarget.kernels.cpu_build (plain C11 + pthreads, no Python or
 * torch headers, so it compiles in about a second), called by tritarget.kernels.cpu.
 * It computes exactly what tritarget.kernels.reference computes (read its module
 * docstring for the rules) without ever holding an image's [G, A] IoU matrix:
 *
 *   pass 1  per (image, chunk of anchors): every anchor's raw best IoU and best box
 *           (lowest box index on ties), whether it is excluded (ignore region, border
 *           "pre_match"), per-thread partial maxima of each box over the included anchors
 *           (lowest anchor index on ties); then the chunk's outputs as the thresholds and
 *           border rules decide them, written once: labels, matched, deltas, classes.
 *   merge   per box: its best IoU and best anchor over all anchors of its image.
 *   pass 2  low-quality lifts (torchvision, detectron2, mmdet): only chunks whose best
 *           IoU reaches some box's best IoU are revisited, only the boxes that can tie
 *           there are recomputed, and only the lifted anchors are rewritten.
 *   forced  ssd_forced: each box's best anchor, in box order (a later box wins).
 *
 * Memory: the outputs plus O(threads * (chunk + G)). Exactness: every IoU is computed
 * with torchvision's operation order in float32, one rounding per operation. The build
 * passes -ffp-contract=off and never -ffast-math, so the compiler fuses no multiply-add
 * and keeps IEEE semantics; vectorised and scalar evaluations then give the same bits,
 * which is what makes the equality tests of the low-quality rule agree with torch.
 */

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

/* Anchors per work item. 512 anchors keep the chunk's SoA coordinates, running maxima
 * and IoU scratch (~12 KiB) in L1, and still give ~400 items per RetinaNet image, enough
 * to balance two to dozens of threads. */
#define CHUNK 512

enum { LQ_NONE = 0, LQ_TORCHVISION = 1, LQ_DETECTRON2 = 2, LQ_MMDET = 3, LQ_SSD_FORCED = 4 };
enum { POSITIVE = 1, NEGATIVE = 0, IGNORED = -1 };

/* Everything one call needs; laid out identically by the ctypes Structure in cpu.py. */
typedef struct {
    /* inputs */
    const float *anchors;        /* [A, 4] x1 y1 x2 y2 */
    const float *gt_boxes;       /* [N, 4] */
    const int64_t *gt_offsets;   /* [B + 1] */
    const int32_t *gt_classes;   /* [N] or NULL */
    const float *ignore_boxes;   /* [M, 4] */
    const int64_t *ignore_offsets; /* [B + 1] */
    const float *border_limits;  /* [B, 4] (-b, -b, w + b, h + b) as float32, or NULL (rule off) */
    int64_t num_anchors;
    int64_t batch;
    /* matching (thresholds already rounded to float32, as torch compares them) */
    float high, low, min_pos_iou, ignore_iof_thr;
    int32_t strict_high, low_quality, use_ignore, iof_wrt_anchor, border_post;
    /* encoding */
    float weights[4], means[4], stds[4];
    int32_t background_class;
    int32_t num_threads;
    /* outputs, [B, A] (deltas [B, A, 4]); classes may be NULL */
    int8_t *labels;
    int32_t *matched;
    float *deltas;
    int32_t *classes;
    float *max_iou;              /* each anchor's best IoU (unmasked), or NULL when not asked for */
    /* per-box scratch [N]: best IoU over included anchors and the anchor reaching it */
    float *box_max;
    int32_t *box_best;
} Problem;

/* One thread's partial per-box maxima, over the anchors it has processed. */
typedef struct {
    float *max;
    int32_t *best;
} BoxPartial;

typedef struct {
    const Problem *p;
    atomic_long next_item;
    int64_t chunks_per_image;
    int64_t num_items;
    BoxPartial *partials; /* one per thread */
    /* per work item, from pass 1: best IoU of an included anchor (-1 if none) and the
     * chunk's bounds (lo_x, lo_y, hi_x, hi_y); pass 2 skips the chunks no lift can reach */
    float *chunk_reach;
    float *chunk_bounds;
} Job;

typedef struct {
    Job *job;
    int thread;
    void (*body)(Job *, int, int64_t, int64_t);
} Worker;

/* ---- geometry, in torchvision's order ---------------------------------------------- */

/* IoU of box (b*) with anchor (a*); barea/aarea are (x2 - x1) * (y2 - y1). */
static inline float iou_one(float bx1, float by1, float bx2, float by2, float barea,
                            float ax1, float ay1, float ax2, float ay2, float aarea) {
    float w = (bx2 < ax2 ? bx2 : ax2) - (bx1 > ax1 ? bx1 : ax1);
    float h = (by2 < ay2 ? by2 : ay2) - (by1 > ay1 ? by1 : ay1);
    w = w > 0.0f ? w : 0.0f;
    h = h > 0.0f ? h : 0.0f;
    float inter = w * h;
    float uni = (barea + aarea) - inter;
    /* "0 where the union is 0": also covers NaN coordinates of explicit anchors. */
    return uni > 0.0f ? inter / uni : 0.0f;
}

/* An anchor's coordinates, structure-of-arrays, for a chunk. */
typedef struct {
    float x1[CHUNK], y1[CHUNK], x2[CHUNK], y2[CHUNK], area[CHUNK];
    uint8_t excluded[CHUNK];
    /* bounding box of the chunk: a box outside it has IoU exactly 0 with every anchor */
    float lo_x, lo_y, hi_x, hi_y;
    int64_t n;
} Chunk;

static void load_chunk(const Problem *p, int64_t start, int64_t n, Chunk *c) {
    const float *a = p->anchors + 4 * start;
    for (int64_t k = 0; k < n; ++k) {
        float x1 = a[4 * k], y1 = a[4 * k + 1], x2 = a[4 * k + 2], y2 = a[4 * k + 3];
        c->x1[k] = x1; c->y1[k] = y1; c->x2[k] = x2; c->y2[k] = y2;
        c->area[k] = (x2 - x1) * (y2 - y1);
    }
    /* Bounds only decide which boxes to skip: a NaN coordinate never enters them (the
     * comparisons are false), and min/max are exact in any order, so the reduction may be
     * vectorised (OpenMP simd, no -ffast-math needed). */
    float lo_x = INFINITY, lo_y = INFINITY, hi_x = -INFINITY, hi_y = -INFINITY;
#pragma omp simd reduction(min : lo_x, lo_y) reduction(max : hi_x, hi_y)
    for (int64_t k = 0; k < n; ++k) {
        lo_x = c->x1[k] < lo_x ? c->x1[k] : lo_x;
        lo_y = c->y1[k] < lo_y ? c->y1[k] : lo_y;
        hi_x = c->x2[k] > hi_x ? c->x2[k] : hi_x;
        hi_y = c->y2[k] > hi_y ? c->y2[k] : hi_y;
    }
    c->lo_x = lo_x; c->lo_y = lo_y; c->hi_x = hi_x; c->hi_y = hi_y;
    c->n = n;
}

/* Whether a box certainly has zero intersection with every anchor of the chunk
 * (then each IoU is exactly +0: inter is 0 and 0 / union is 0). NaN anchors do not
 * widen the bounds, and their IoU is 0 anyway. */
static inline int box_misses_chunk(const Chunk *c, const float *b) {
    return b[2] <= c->lo_x || b[0] >= c->hi_x || b[3] <= c->lo_y || b[1] >= c->hi_y;
}

static inline int anchor_inside(const float *lim, float x1, float y1, float x2, float y2) {
    return x1 >= lim[0] && y1 >= lim[1] && x2 < lim[2] && y2 < lim[3];
}

/* Anchors taken out before matching: inside an ignore region or, with "pre_match",
 * across the border (reference.excluded_by_ignore / outside_border). */
static void mark_excluded(const Problem *p, int64_t image, Chunk *c) {
    memset(c->excluded, 0, (size_t)c->n);
    if (p->border_limits && !p->border_post) {
        const float *lim = p->border_limits + 4 * image;
        for (int64_t k = 0; k < c->n; ++k)
            c->excluded[k] = !anchor_inside(lim, c->x1[k], c->y1[k], c->x2[k], c->y2[k]);
    }
    if (!p->use_ignore) return;
    int64_t m0 = p->ignore_offsets[image], m1 = p->ignore_offsets[image + 1];
    for (int64_t m = m0; m < m1; ++m) {
        const float *r = p->ignore_boxes + 4 * m;
        if (box_misses_chunk(c, r)) continue; /* IoF 0 never exceeds a threshold >= 0 */
        float rarea = (r[2] - r[0]) * (r[3] - r[1]);
        for (int64_t k = 0; k < c->n; ++k) {
            float w = (c->x2[k] < r[2] ? c->x2[k] : r[2]) - (c->x1[k] > r[0] ? c->x1[k] : r[0]);
            float h = (c->y2[k] < r[3] ? c->y2[k] : r[3]) - (c->y1[k] > r[1] ? c->y1[k] : r[1]);
            w = w > 0.0f ? w : 0.0f;
            h = h > 0.0f ? h : 0.0f;
            float inter = w * h;
            float area = p->iof_wrt_anchor ? c->area[k] : rarea;
            float iof = area > 0.0f ? inter / area : 0.0f;
            c->excluded[k] |= iof > p->ignore_iof_thr;
        }
    }
}

static void encode_one(const Problem *p, const float *g, float ax1, float ay1, float ax2, float ay2,
                       float *out) {
    /* reference.encode / torchvision BoxCoder.encode_boxes, same rounding order */
    float aw = ax2 - ax1, ah = ay2 - ay1;
    float acx = ax1 + 0.5f * aw, acy = ay1 + 0.5f * ah;
    float gw = g[2] - g[0], gh = g[3] - g[1];
    float gcx = g[0] + 0.5f * gw, gcy = g[1] + 0.5f * gh;
    float d[4];
    d[0] = p->weights[0] * (gcx - acx) / aw;
    d[1] = p->weights[1] * (gcy - acy) / ah;
    d[2] = p->weights[2] * logf(gw / aw);
    d[3] = p->weights[3] * logf(gh / ah);
    for (int j = 0; j < 4; ++j) out[j] = (d[j] - p->means[j]) / p->stds[j];
}

/* Write a chunk's decided labels and matches: applies the "post_match" border rule,
 * then deltas and classes of the positives (zeros and background elsewhere). */
static void write_chunk(const Problem *p, int64_t image, int64_t start, int64_t n, uint8_t *positive,
                        int8_t *label, int32_t *match) {
    const int64_t row = image * p->num_anchors + start;
    const float *an = p->anchors + 4 * start;
    if (p->border_limits && p->border_post) {
        const float *lim = p->border_limits + 4 * image;
        for (int64_t k = 0; k < n; ++k) {
            int outside = !anchor_inside(lim, an[4 * k], an[4 * k + 1], an[4 * k + 2], an[4 * k + 3]);
            positive[k] &= (uint8_t)!outside;
            label[k] = outside ? (int8_t)IGNORED : label[k];
            if (p->low_quality != LQ_DETECTRON2) match[k] = outside ? -1 : match[k];
        }
    }
    memcpy(p->labels + row, label, (size_t)n);
    memcpy(p->matched + row, match, sizeof(int32_t) * (size_t)n);
    memset(p->deltas + 4 * row, 0, sizeof(float) * 4 * (size_t)n);
    if (p->classes)
        for (int64_t k = 0; k < n; ++k) p->classes[row + k] = p->background_class;
    const int64_t g0 = p->gt_offsets[image];
    for (int64_t k = 0; k < n; ++k) {
        if (!positive[k]) continue;
        const int64_t g = g0 + match[k];
        encode_one(p, p->gt_boxes + 4 * g, an[4 * k], an[4 * k + 1], an[4 * k + 2], an[4 * k + 3],
                   p->deltas + 4 * (row + k));
        if (p->classes) p->classes[row + k] = p->gt_classes[g];
    }
}

/* Outputs of a chunk from the thresholds alone (pass 2 adds low-quality lifts).
 * best[n]: each anchor's best IoU (zeroed here for an image without boxes);
 * argmax[n]: its best box within the image; excluded[n]: taken out before matching. */
static void decide_chunk(const Problem *p, int64_t image, int64_t start, int64_t n, float *best,
                         const int32_t *argmax, const uint8_t *excluded) {
    const int64_t row = image * p->num_anchors + start;
    const int no_boxes = p->gt_offsets[image + 1] == p->gt_offsets[image];
    uint8_t above[CHUNK], below[CHUNK], positive[CHUNK];
    int8_t label[CHUNK];
    int32_t match[CHUNK];
    const float high = p->high, low = p->low;
    if (no_boxes) { /* included anchors are negative; max IoU is 0 */
        for (int64_t k = 0; k < n; ++k) {
            best[k] = 0.0f;
            above[k] = 0;
            below[k] = 1;
        }
    } else if (p->strict_high) { /* DALI/MLPerf's single criterion: the interval is (low, high] */
        for (int64_t k = 0; k < n; ++k) {
            above[k] = best[k] > high;
            below[k] = best[k] <= low;
        }
    } else {
        for (int64_t k = 0; k < n; ++k) {
            above[k] = best[k] >= high;
            below[k] = best[k] < low;
        }
    }
    for (int64_t k = 0; k < n; ++k) {
        uint8_t included = !excluded[k];
        uint8_t pos = above[k] & included;
        uint8_t neg = below[k] & included & !pos;
        positive[k] = pos;
        label[k] = (int8_t)(pos - !(pos | neg)); /* 1, 0, or -1 */
    }
    if (p->low_quality == LQ_DETECTRON2 && !no_boxes) /* detectron2's Matcher keeps every included argmax */
        for (int64_t k = 0; k < n; ++k) match[k] = excluded[k] ? -1 : argmax[k];
    else
        for (int64_t k = 0; k < n; ++k) match[k] = positive[k] ? argmax[k] : -1;
    if (p->max_iou) memcpy(p->max_iou + row, best, sizeof(float) * (size_t)n);
    write_chunk(p, image, start, n, positive, label, match);
}

/* ---- pass 1 --------------------------------------------------------------------------- */

static void pass1_item(Job *job, int thread, int64_t image, int64_t chunk) {
    const Problem *p = job->p;
    const int64_t A = p->num_anchors, start = chunk * CHUNK;
    const int64_t n = (A - start) < CHUNK ? (A - start) : CHUNK;
    const int64_t g0 = p->gt_offsets[image], g1 = p->gt_offsets[image + 1];
    const int want_box_max = p->low_quality != LQ_NONE;
    BoxPartial part = job->partials[thread];
    Chunk c;
    float best[CHUNK];
    int32_t arg[CHUNK];
    /* IoU over included anchors, -1 for excluded ones. Read back as int32: for -1 and
     * non-negative floats (never NaN, never -0) the bit patterns order like the values,
     * and an integer max vectorises where a float max would need -ffast-math. */
    union {
        float f[CHUNK];
        int32_t i[CHUNK];
    } masked;

    load_chunk(p, start, n, &c);
    mark_excluded(p, image, &c);
    for (int64_t k = 0; k < n; ++k) {
        best[k] = -1.0f; /* below every IoU, so box 0 always takes it: argmax 0 by default */
        arg[k] = 0;
    }
    int64_t first_included = -1;
    for (int64_t k = 0; k < n && first_included < 0; ++k)
        if (!c.excluded[k]) first_included = k;

    for (int64_t g = g0; g < g1; ++g) {
        const float *b = p->gt_boxes + 4 * g;
        const int32_t local = (int32_t)(g - g0);
        float chunk_max = -1.0f; /* best IoU of box g over the chunk's included anchors */
        if (box_misses_chunk(&c, b)) {
            if (local == 0)
                for (int64_t k = 0; k < n; ++k) best[k] = 0.0f; /* arg stays 0 */
            if (first_included >= 0) chunk_max = 0.0f;
            if (want_box_max && chunk_max > part.max[g]) {
                part.max[g] = chunk_max;
                part.best[g] = (int32_t)(start + first_included);
            }
            continue;
        }
        const float bx1 = b[0], by1 = b[1], bx2 = b[2], by2 = b[3];
        const float barea = (bx2 - bx1) * (by2 - by1);
        for (int64_t k = 0; k < n; ++k) {
            float v = iou_one(bx1, by1, bx2, by2, barea, c.x1[k], c.y1[k], c.x2[k], c.y2[k], c.area[k]);
            int up = v > best[k];
            best[k] = up ? v : best[k];
            arg[k] = up ? local : arg[k];
            masked.f[k] = c.excluded[k] ? -1.0f : v;
        }
        if (!want_box_max) continue;
        int32_t top = masked.i[0];
        for (int64_t k = 1; k < n; ++k) top = masked.i[k] > top ? masked.i[k] : top;
        union {
            int32_t i;
            float f;
        } as_float = {top};
        chunk_max = as_float.f;
        /* Strictly greater: this thread sees its items in increasing anchor order, so an
         * equal value found earlier has the lower index (the merge settles other ties). */
        if (chunk_max > part.max[g]) {
            int64_t k = 0;
            while (masked.i[k] != top) ++k;
            part.max[g] = chunk_max;
            part.best[g] = (int32_t)(start + k);
        }
    }

    float reach = -1.0f;
#pragma omp simd reduction(max : reach)
    for (int64_t k = 0; k < n; ++k) {
        float v = c.excluded[k] ? -1.0f : best[k];
        reach = v > reach ? v : reach;
    }
    const int64_t item = image * job->chunks_per_image + chunk;
    job->chunk_reach[item] = reach;
    float *bounds = job->chunk_bounds + 4 * item;
    bounds[0] = c.lo_x;
    bounds[1] = c.lo_y;
    bounds[2] = c.hi_x;
    bounds[3] = c.hi_y;
    decide_chunk(p, image, start, n, best, arg, c.excluded);
}

/* ---- pass 2: low-quality lifts ------------------------------------------------------- */

/* An anchor's best box, as pass 1 found it (same IoUs, same strictly-greater order).
 * Starting from (0, box 0) is what box 0 gives at worst, and a box that does not touch
 * the anchor has IoU 0, which never beats it: such boxes are skipped. */
static int32_t best_box(const Problem *p, int64_t image, const Chunk *c, int64_t k) {
    const int64_t g0 = p->gt_offsets[image], g1 = p->gt_offsets[image + 1];
    float top = 0.0f;
    int32_t at = 0;
    for (int64_t g = g0; g < g1; ++g) {
        const float *b = p->gt_boxes + 4 * g;
        if (b[2] <= c->x1[k] || b[0] >= c->x2[k] || b[3] <= c->y1[k] || b[1] >= c->y2[k]) continue;
        float v = iou_one(b[0], b[1], b[2], b[3], (b[2] - b[0]) * (b[3] - b[1]), c->x1[k], c->y1[k], c->x2[k],
                          c->y2[k], c->area[k]);
        if (v > top) {
            top = v;
            at = (int32_t)(g - g0);
        }
    }
    return at;
}

static int box_misses_bounds(const float *bounds, const float *b) {
    return b[2] <= bounds[0] || b[0] >= bounds[2] || b[3] <= bounds[1] || b[1] >= bounds[3];
}

/* Whether box g takes part in low-quality matching: its best IoU is above 0 (a box
 * touching no included anchor lifts nothing) and reaches min_pos_iou. */
static int box_qualifies(const Problem *p, int64_t g) {
    const float target = p->box_max[g];
    return target > 0.0f && target >= p->min_pos_iou;
}

/* Box g lifts the included anchors whose IoU with it equals its best IoU (when it
 * qualifies). None in a chunk can, when the chunk's best IoU is lower, or when the box
 * does not touch the chunk. */
static int box_may_lift(const Problem *p, int64_t g, float reach, const float *bounds) {
    if (!box_qualifies(p, g) || p->box_max[g] > reach) return 0;
    return !box_misses_bounds(bounds, p->gt_boxes + 4 * g);
}

static void pass2_item(Job *job, int thread, int64_t image, int64_t chunk) {
    (void)thread;
    const Problem *p = job->p;
    const int64_t A = p->num_anchors, start = chunk * CHUNK;
    const int64_t n = (A - start) < CHUNK ? (A - start) : CHUNK;
    const int64_t g0 = p->gt_offsets[image], g1 = p->gt_offsets[image + 1];
    const int64_t row = image * A + start;
    const int64_t item = image * job->chunks_per_image + chunk;
    const float reach = job->chunk_reach[item];
    const float *bounds = job->chunk_bounds + 4 * item;

    int64_t g = g0;
    while (g < g1 && !box_may_lift(p, g, reach, bounds)) ++g;
    if (g == g1) return; /* the usual case: this chunk's outputs are final */

    Chunk c;
    uint8_t lifted[CHUNK];
    int32_t lift_box[CHUNK];
    load_chunk(p, start, n, &c);
    mark_excluded(p, image, &c);
    for (int64_t k = 0; k < n; ++k) {
        lifted[k] = 0;
        lift_box[k] = -1;
    }
    for (; g < g1; ++g) {
        if (!box_may_lift(p, g, reach, bounds)) continue;
        const float *b = p->gt_boxes + 4 * g;
        const float target = p->box_max[g];
        const float bx1 = b[0], by1 = b[1], bx2 = b[2], by2 = b[3];
        const float barea = (bx2 - bx1) * (by2 - by1);
        const int32_t local = (int32_t)(g - g0);
        for (int64_t k = 0; k < n; ++k) {
            float v = iou_one(bx1, by1, bx2, by2, barea, c.x1[k], c.y1[k], c.x2[k], c.y2[k], c.area[k]);
            int tie = (v == target) & !c.excluded[k];
            lifted[k] |= (uint8_t)tie;
            lift_box[k] = tie ? local : lift_box[k]; /* mmdet: the later box overwrites */
        }
    }
    const float *lim = p->border_limits && p->border_post ? p->border_limits + 4 * image : NULL;
    for (int64_t k = 0; k < n; ++k) {
        if (!lifted[k]) continue;
        if (lim && !anchor_inside(lim, c.x1[k], c.y1[k], c.x2[k], c.y2[k])) continue; /* stays ignored */
        const int was_positive = p->labels[row + k] == POSITIVE;
        int32_t match;
        if (p->low_quality == LQ_MMDET) { /* matched to the box it ties (the last one) */
            match = lift_box[k];
            if (was_positive && p->matched[row + k] == match) continue;
        } else { /* torchvision / detectron2: matched to its own best box */
            if (was_positive) continue;
            match = best_box(p, image, &c, k);
        }
        uint8_t positive = 1;
        int8_t label = POSITIVE;
        write_chunk(p, image, start + k, 1, &positive, &label, &match);
    }
}

/* ---- threads -------------------------------------------------------------------------- */

static void *worker_main(void *arg) {
    Worker *w = (Worker *)arg;
    Job *job = w->job;
    for (;;) {
        int64_t item = atomic_fetch_add(&job->next_item, 1);
        if (item >= job->num_items) break;
        /* image-major order: each thread meets its items in increasing anchor order */
        w->body(job, w->thread, item / job->chunks_per_image, item % job->chunks_per_image);
    }
    return NULL;
}

static void run_parallel(Job *job, int threads, void (*body)(Job *, int, int64_t, int64_t)) {
    Worker workers[threads];
    pthread_t ids[threads];
    int started[threads];
    atomic_store(&job->next_item, 0);
    for (int t = 0; t < threads; ++t) {
        workers[t] = (Worker){job, t, body};
        started[t] = 0;
    }
    for (int t = 1; t < threads; ++t)
        started[t] = pthread_create(&ids[t], NULL, worker_main, &workers[t]) == 0;
    worker_main(&workers[0]); /* the calling thread works too; if a thread failed to start, others do its share */
    for (int t = 1; t < threads; ++t)
        if (started[t]) pthread_join(ids[t], NULL);
}

/* ---- entry point ---------------------------------------------------------------------- */

/* Ask Linux for transparent huge pages on a large output buffer before its first touch:
 * a fresh batch of outputs (93 MB for 16 RetinaNet images) otherwise costs one page
 * fault per 4 KiB, which measured 3x slower than filling it. A hint only: ignored where
 * huge pages are off, and limited to whole 2 MiB pages inside the buffer. */
static void advise_huge_pages(void *data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    uintptr_t lo = ((uintptr_t)data + huge - 1) & ~(huge - 1);
    uintptr_t hi = ((uintptr_t)data + bytes) & ~(huge - 1);
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
#else
    (void)data;
    (void)bytes;
#endif
}

/* Returns 0 on success, 1 when scratch memory could not be allocated. */
int tritarget_cpu_solve(const Problem *p) {
    const int64_t A = p->num_anchors, B = p->batch;
    const int64_t N = p->gt_offsets[B];
    int threads = p->num_threads > 0 ? p->num_threads : 1;
    const int64_t chunks = (A + CHUNK - 1) / CHUNK;
    if (chunks * B < threads) threads = (int)(chunks * B > 0 ? chunks * B : 1);

    Job job;
    job.p = p;
    job.chunks_per_image = chunks;
    job.num_items = chunks * B;
    job.partials = calloc((size_t)threads, sizeof(BoxPartial));
    float *part_max = malloc(sizeof(float) * (size_t)(threads * N + 1));
    int32_t *part_best = malloc(sizeof(int32_t) * (size_t)(threads * N + 1));
    job.chunk_reach = malloc(sizeof(float) * (size_t)(job.num_items + 1));
    job.chunk_bounds = malloc(sizeof(float) * 4 * (size_t)(job.num_items + 1));
    if (!job.partials || !part_max || !part_best || !job.chunk_reach || !job.chunk_bounds) {
        free(job.partials); free(part_max); free(part_best); free(job.chunk_reach); free(job.chunk_bounds);
        return 1;
    }
    for (int64_t j = 0; j < threads * N; ++j) {
        part_max[j] = -1.0f; /* no included anchor seen: torch's max over all -1 is (-1, 0) */
        part_best[j] = 0;
    }
    for (int t = 0; t < threads; ++t) job.partials[t] = (BoxPartial){part_max + t * N, part_best + t * N};

    const size_t cells = (size_t)(A * B);
    advise_huge_pages(p->labels, cells);
    advise_huge_pages(p->matched, cells * sizeof(int32_t));
    advise_huge_pages(p->deltas, cells * 4 * sizeof(float));
    if (p->classes) advise_huge_pages(p->classes, cells * sizeof(int32_t));
    if (p->max_iou) advise_huge_pages(p->max_iou, cells * sizeof(float));

    if (A > 0) run_parallel(&job, threads, pass1_item);

    /* merge: best IoU per box, lowest anchor index among equal maxima */
    for (int64_t g = 0; g < N; ++g) {
        float m = -1.0f;
        int32_t at = 0;
        for (int t = 0; t < threads; ++t) {
            float v = job.partials[t].max[g];
            int32_t i = job.partials[t].best[g];
            if (v > m || (v == m && i < at)) { m = v; at = i; }
        }
        p->box_max[g] = m;
        p->box_best[g] = at;
    }

    const int lifts = p->low_quality == LQ_TORCHVISION || p->low_quality == LQ_DETECTRON2 ||
                      p->low_quality == LQ_MMDET;
    if (A > 0 && lifts) run_parallel(&job, threads, pass2_item);

    if (p->low_quality == LQ_SSD_FORCED && A > 0) {
        /* in box order, so the later box keeps an anchor two boxes share */
        for (int64_t image = 0; image < B; ++image) {
            for (int64_t g = p->gt_offsets[image]; g < p->gt_offsets[image + 1]; ++g) {
                const int64_t a = p->box_best[g];
                Chunk one;
                load_chunk(p, a, 1, &one);
                mark_excluded(p, image, &one);
                if (box_qualifies(p, g) && !one.excluded[0]) {
                    uint8_t positive = 1;
                    int8_t label = POSITIVE;
                    int32_t match = (int32_t)(g - p->gt_offsets[image]);
                    write_chunk(p, image, a, 1, &positive, &label, &match);
                }
            }
        }
    }
    free(job.partials); free(part_max); free(part_best); free(job.chunk_reach); free(job.chunk_bounds);
    return 0;
}

/* ---- sparse form ---------------------------------------------------------------------- */

/* How many anchors of each image are positive and how many ignored.
 * labels: [batch, num_anchors]; positives, ignored: [batch]. */
void tritarget_cpu_count_sparse(const int8_t *labels, int64_t batch, int64_t num_anchors, int64_t *positives,
                                int64_t *ignored) {
    for (int64_t i = 0; i < batch; ++i) {
        const int8_t *row = labels + i * num_anchors;
        int64_t pos = 0, ign = 0;
        for (int64_t a = 0; a < num_anchors; ++a) {
            pos += row[a] == POSITIVE;
            ign += row[a] == IGNORED;
        }
        positives[i] = pos;
        ignored[i] = ign;
    }
}

/* The positives (anchor index, matched box, deltas, class) and the ignored anchors of a
 * dense result, image after image, ascending anchor index within an image: the rows of
 * SparseTargets, sized by tritarget_cpu_count_sparse. classes/pos_classes may be NULL. */
void tritarget_cpu_gather_sparse(const int8_t *labels, const int32_t *matched, const float *deltas,
                                 const int32_t *classes, int64_t batch, int64_t num_anchors, int32_t *pos_anchors,
                                 int32_t *pos_matched, float *pos_deltas, int32_t *pos_classes,
                                 int32_t *ign_anchors) {
    int64_t p = 0, q = 0;
    for (int64_t i = 0; i < batch; ++i) {
        for (int64_t a = 0; a < num_anchors; ++a) {
            const int64_t r = i * num_anchors + a;
            if (labels[r] == POSITIVE) {
                pos_anchors[p] = (int32_t)a;
                pos_matched[p] = matched[r];
                memcpy(pos_deltas + 4 * p, deltas + 4 * r, 4 * sizeof(float));
                if (classes) pos_classes[p] = classes[r];
                ++p;
            } else if (labels[r] == IGNORED) {
                ign_anchors[q++] = (int32_t)a;
            }
        }
    }
}
