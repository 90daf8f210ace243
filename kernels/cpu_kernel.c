/* The CPU path's fused kernel: IoU -> max-IoU matching -> encoding, streaming over anchors.
 *
 * Built and loaded by tritarget.kernels.cpu_build (plain C11 + pthreads, no Python or
 * torch headers, so it compiles in about 0.3 s), called by tritarget.kernels.cpu.
 * It computes exactly what tritarget.kernels.reference computes (read its module
 * docstring for the rules) without ever holding an image's [G, A] IoU matrix:
 *
 *   pass 1  per (image, chunk of 512 anchors): every anchor's raw best IoU and best box
 *           (lowest box index on ties), whether it is excluded (ignore region, border
 *           "pre_match", cell beyond the image's padded size), per-thread partial maxima of each box over the included anchors
 *           (lowest anchor index on ties); then the chunk's outputs as the thresholds and
 *           border rules decide them, written once.
 *   merge   per box: its best IoU and best anchor over the included anchors of its image.
 *   pass 2  low-quality lifts (torchvision, detectron2, mmdet): only chunks whose best
 *           IoU reaches some box's best IoU are revisited, only the boxes that can tie
 *           there are recomputed, and only the lifted anchors are rewritten.
 *   forced  ssd_forced: each box's best anchor, in box order (a later box wins).
 *
 * Two outputs share these passes. tritarget_cpu_solve writes dense [B, A] targets.
 * tritarget_cpu_solve_sparse writes none: each chunk's positives (anchor, matched box)
 * and ignored anchors become rows of per-thread growable lists, pass 2 and ssd_forced
 * replace the rows of the chunks they change, and tritarget_cpu_emit_sparse writes each
 * image's row offsets and copies the rows chunk after chunk (so in ascending anchor order)
 * into the caller's outputs, sized by the counts the first call returned, encoding the
 * positives' deltas as it goes. A RetinaNet image has ~200 rows where the dense form
 * writes 5 MB.
 *
 * Skipping: anchors come in blocks of 64 whose bounds (bounding box, area range) the
 * caller computes (tritarget_cpu_bounds: once per generated set, on each call for explicit
 * anchors). A box that misses a block has IoU exactly 0 with each of its anchors; a box
 * whose IoU there is provably below both thresholds and below its best IoU found so far
 * (iou_bound: a big box against small anchors, a small box against big ones) changes no
 * output there. Either way the block is neither read nor computed for that box. Chunks go in decreasing anchor order,
 * so large anchors, where a box usually finds its best IoU, come first. A sparse solve
 * does not even open a chunk where nothing can make an anchor other than negative: a
 * COCO-like image reads a small fraction of the 201,600 RetinaNet anchors, which alone
 * take ~0.2 ms to read.
 *
 * A crowded image's boxes are indexed so that a chunk meets only those that touch it (see
 * "the boxes that touch a chunk").
 *
 * Memory beyond the outputs: O(threads * (chunk + G) + A * B / chunk) scratch, the index
 * (36 bytes per box of the batch, once an image has INDEX_MIN_BOXES boxes), plus the sparse rows
 * (a chunk pass 2 or ssd_forced changes is stored twice). Exactness: every IoU is computed
 * with torchvision's operation order in float32, one rounding per operation. The build
 * passes -ffp-contract=off and never -ffast-math, so the compiler fuses no multiply-add
 * and keeps IEEE semantics (-fno-trapping-math only lets it evaluate both sides of a
 * select, so that the pair loops vectorise without AVX-512's masks); vectorised and scalar
 * evaluations then give the same bits, which is what makes the equality tests of the
 * low-quality rule agree with torch.
 */

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/mman.h>
#include <sys/prctl.h>
#endif

/* Anchors per work item. 512 anchors keep the chunk's SoA coordinates, running maxima
 * and IoU scratch (~16 KiB) in L1, and still give ~400 items per RetinaNet image, enough
 * to balance two to dozens of threads. */
#define CHUNK 512
/* Anchors per skipping unit: 64 RetinaNet P3 anchors span ~130 x 70 pixels, about the
 * size of a small box, and are 8 AVX2 vectors of work. */
#define BLOCK 64
_Static_assert(CHUNK % BLOCK == 0 && CHUNK / BLOCK <= 32, "a chunk's blocks are bits of an unsigned mask");
/* A block's bounds: min x1, min y1, max x2, max y2 of its anchors, and their least and
 * greatest area. */
#define BOUNDS 6
/* Boxes per branch-free run of tritarget_cpu_boxes_valid: a bad box among many stops it
 * within one run. */
#define VALID_RUN 1024
/* Margin on an upper bound of IoU computed in float32 (a few roundings, each 6e-8). */
#define BOUND_SLACK 1.001f
/* Sparse rows one thread emits, at least, before another thread is worth starting. */
#define EMIT_ROWS_PER_THREAD 16384
/* Boxes of an image from which they are indexed (touching): below, testing each box
 * against a chunk costs about what looking them up does. Height classes: binary exponents
 * of a box's height, those under 1 in the first (heights are below 2^33, BOX_REACH). */
#define INDEX_MIN_BOXES 64
#define HEIGHT_CLASSES 34
/* How far a gt box may reach from the origin: tritarget.kernels.problem.BOX_REACH. */
#define BOX_REACH 2147483648.0f

enum { LQ_NONE = 0, LQ_TORCHVISION = 1, LQ_DETECTRON2 = 2, LQ_MMDET = 3, LQ_SSD_FORCED = 4 };
enum { POSITIVE = 1, NEGATIVE = 0, IGNORED = -1 };

/* Everything one call needs; laid out identically by the ctypes Structure in cpu.py. */
typedef struct {
    /* inputs */
    const float *anchors;        /* [A, 4] x1 y1 x2 y2, finite (build_problem refuses others) */
    const float *bounds;         /* [ceil(A / BLOCK) + ceil(A / CHUNK), BOUNDS] from tritarget_cpu_bounds */
    const float *gt_boxes;       /* [N, 4] */
    const int64_t *gt_offsets;   /* [B + 1] */
    const int32_t *gt_classes;   /* [N] int32 classes, or NULL */
    const int64_t *gt_classes64; /* [N] int64 classes (torchvision's labels) read as given, or NULL; not both */
    const float *ignore_boxes;   /* [M, 4] */
    const int64_t *ignore_offsets; /* [B + 1] */
    const float *border_limits;  /* [B, 4] (-b, -b, w + b, h + b) as float32, or NULL (rule off) */
    const int32_t *valid_cells;  /* [B, L, 2] rows, columns of each level inside the image's padded size, or NULL */
    const int64_t *levels;       /* [L, 4] first anchor, height, width, shapes per cell (read with valid_cells) */
    int64_t num_anchors;
    int64_t batch;
    int64_t num_levels;
    /* matching (thresholds already rounded to float32, as torch compares them) */
    float high, low, min_pos_iou, ignore_iof_thr;
    int32_t strict_high, low_quality, use_ignore, iof_wrt_anchor, border_post;
    int32_t shape_major;         /* anchors of a level are [K, H, W] (yolo), else [H, W, K] */
    /* encoding */
    float weights[4], means[4], stds[4];
    int32_t background_class;
    int32_t num_threads;
    /* Check the gt boxes first (build_problem left them to this call): the rule of
     * tritarget_cpu_boxes_valid against the canvas (width, height), as float32. */
    int32_t check_gt_boxes;
    float canvas_width, canvas_height;
    /* dense outputs (tritarget_cpu_solve only), [B, A] (deltas [B, A, 4]); classes may be NULL */
    int8_t *labels;
    int32_t *matched;
    float *deltas;
    int32_t *classes;
    float *max_iou;              /* each anchor's best IoU (unmasked), or NULL when not asked for */
} Problem;

/* One thread's partial per-box maxima, over the anchors it has processed. */
typedef struct {
    float *max;
    int32_t *best;
} BoxPartial;

/* ---- sparse rows ----------------------------------------------------------------------- */

typedef struct {
    int32_t anchor; /* within the image */
    int32_t box;    /* matched box within the image */
} PositiveRow;

/* Rows one thread appends during one pass. Only its owner appends (which may move the
 * arrays), so others read them only after that pass has ended. */
typedef struct {
    PositiveRow *pos;
    int32_t *ign;
    int64_t npos, nign, pos_cap, ign_cap;
    int failed; /* an allocation failed */
} Rows;

/* Where a work item's current rows are (ascending anchor order within each list). */
typedef struct {
    const Rows *rows;
    int64_t pos_at, ign_at;
    int32_t npos, nign;
} ItemRows;

/* The boxes of one height class of an image: entries [begin, end) of its index, sorted by
 * top (y1); reach: their greatest height, in double. */
typedef struct {
    int32_t begin, end;
    double reach;
} HeightClass;

/* A box's coordinates and its index within its image, as the index keeps them. */
typedef struct {
    float box[4];
    int32_t index;
} IndexedBox;

/* Boxes of a batch (gt boxes, or ignore regions; offsets [B + 1] as the Problem's), those
 * of each image with at least INDEX_MIN_BOXES of them indexed by height and top, their
 * coordinates copied (see build_index). by_top and classes are [N], an image's entries
 * from its first box's slot; class_count [B] (0: the image is not indexed; NULL: none is).
 * Each thread lists the boxes touching a chunk in its own slice of lists ([threads * most
 * boxes of an image]), put in box order by its bits in marks ([threads * words]). */
typedef struct {
    const int64_t *offsets;
    IndexedBox *by_top;
    HeightClass *classes;
    int32_t *class_count;
    int32_t *lists;
    uint64_t *marks;
    int64_t most, words;
} BoxIndex;

/* ---- one call ------------------------------------------------------------------------------ */

typedef struct {
    const Problem *p;
    int threads;
    atomic_long next_item;
    int64_t chunks_per_image;
    int64_t num_items;
    BoxPartial *partials;  /* one per thread, into part_max / part_best [threads * N] */
    float *part_max;
    int32_t *part_best;
    /* [N] the best IoU over included anchors any thread has found so far for each box, as
     * float bits (non-negative floats order like their bits; 0: nothing above 0 yet). Only
     * for skipping: an attained IoU bounds the box's maximum from below whichever thread
     * found it, so every thread skips as much as one thread alone would (with per-thread
     * bounds alone 2 threads evaluated ~10% more blocks, 8 threads up to 2x as many). */
    atomic_int *box_found;
    float *box_max;        /* [N] merged: each box's best IoU over included anchors (-1: none above 0) */
    int32_t *box_best;     /* [N] and the lowest anchor reaching it */
    /* per work item, from pass 1: best IoU of an included anchor; pass 2 skips the chunks
     * no lift can reach */
    float *chunk_reach;
    /* [threads * 2N] torchvision / detectron2 lifts only, each thread's 2N: the boxes that
     * touch the chunk pass 2 is lifting in, then those touching one of its blocks, in box
     * order, where a lifted anchor looks for its own best box (all G boxes for each lifted
     * anchor made pass 2 quadratic in G) */
    int32_t *near;
    /* the gt boxes and (with use_ignore) the ignore regions, indexed per crowded image */
    BoxIndex boxes, regions;
    /* IoUs below this one change no output when they are not a box's maximum (see
     * iou_bound); 0 when every anchor's exact best IoU and box are outputs */
    float iou_floor;
    /* what IoU 0 makes an included anchor of an image with boxes (the label of every
     * anchor no box touches) */
    int8_t zero_label;
    /* sparse solve only (NULL for a dense one) */
    Rows *rows;            /* [2 * threads]: pass 1's, then pass 2's and ssd_forced's */
    ItemRows *items;       /* [num_items] */
    int64_t *pos_start, *ign_start; /* [num_items] where each item's rows go in the outputs */
    /* sparse outputs, set by tritarget_cpu_emit_sparse */
    int32_t *out_pos_anchors, *out_pos_matched, *out_pos_classes, *out_ign_anchors;
    float *out_pos_deltas;
} Job;

typedef struct {
    Job *job;
    int thread;
    void (*body)(Job *, int, int64_t, int64_t);
    int *running; /* the call's helpers still working (guarded by the pool's lock) */
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
    return uni > 0.0f ? inter / uni : 0.0f; /* "0 where the union is 0" */
}

/* Whether anchor (a*) is inside ignore region r (area rarea) by mmdet's IoF rule. */
static inline int iof_exceeds(const Problem *p, const float *r, float rarea, float ax1, float ay1, float ax2,
                              float ay2, float aarea) {
    float w = (ax2 < r[2] ? ax2 : r[2]) - (ax1 > r[0] ? ax1 : r[0]);
    float h = (ay2 < r[3] ? ay2 : r[3]) - (ay1 > r[1] ? ay1 : r[1]);
    w = w > 0.0f ? w : 0.0f;
    h = h > 0.0f ? h : 0.0f;
    float inter = w * h;
    float area = p->iof_wrt_anchor ? aarea : rarea;
    float iof = area > 0.0f ? inter / area : 0.0f;
    return iof > p->ignore_iof_thr;
}

/* Whether a box certainly has zero intersection with every anchor inside bounds
 * (lo_x, lo_y, hi_x, hi_y): then each IoU is exactly +0 (inter is 0, and 0 / union is 0). */
static inline int box_misses(const float *bounds, const float *b) {
    return b[2] <= bounds[0] || b[0] >= bounds[2] || b[3] <= bounds[1] || b[1] >= bounds[3];
}

/* An upper bound of box b's IoU with any anchor of a block (or chunk): the intersection
 * is at most b's overlap with the bounds, b's area and the anchor's, the union at least
 * either area. Small boxes against big anchors, big boxes against small ones and boxes
 * that graze a block get bounds far below the thresholds. */
static inline float iou_bound(const float *bounds, const float *b, float barea) {
    float w = (b[2] < bounds[2] ? b[2] : bounds[2]) - (b[0] > bounds[0] ? b[0] : bounds[0]);
    float h = (b[3] < bounds[3] ? b[3] : bounds[3]) - (b[1] > bounds[1] ? b[1] : bounds[1]);
    w = w > 0.0f ? w : 0.0f;
    h = h > 0.0f ? h : 0.0f;
    float inter = w * h;
    inter = inter < bounds[5] ? inter : bounds[5];
    inter = inter < barea ? inter : barea;
    /* In double: in float the slack times an intersection of a few subnormal ulps rounded
     * back to it, and the bound fell an ulp below a true IoU (explicit anchors of areas
     * near 2^-125). Rounding the double result to float keeps it above that IoU. */
    return (float)(BOUND_SLACK * (double)inter / (double)(barea > bounds[4] ? barea : bounds[4]));
}

/* Whether box b's IoUs with the anchors inside bounds can be left uncomputed: they are
 * exactly 0, or all below floor. */
static inline int box_skips(const float *bounds, const float *b, float barea, float floor) {
    return box_misses(bounds, b) || (floor > 0.0f && iou_bound(bounds, b, barea) < floor);
}

static inline int anchor_inside(const float *lim, float x1, float y1, float x2, float y2) {
    return x1 >= lim[0] && y1 >= lim[1] && x2 < lim[2] && y2 < lim[3];
}

/* Whether some anchor of [first, end) (indices within the image) may lie on a cell beyond
 * the image's valid cells (reference.outside_padding). Exact within one level of the
 * [H, W, K] order and within one shape of the [K, H, W] order; a block that spans two
 * shapes of a level that has invalid cells answers yes (its anchors are then checked one
 * by one). */
static int block_may_be_padded(const Problem *p, int64_t image, int64_t first, int64_t end) {
    for (int64_t l = 0; l < p->num_levels; ++l) {
        const int64_t *lv = p->levels + 4 * l;
        const int64_t start = lv[0], height = lv[1], width = lv[2], shapes = lv[3];
        const int64_t stop = start + height * width * shapes;
        if (end <= start || first >= stop) continue;
        const int32_t *valid = p->valid_cells + 2 * (image * p->num_levels + l);
        if (valid[0] == height && valid[1] == width) continue;
        int64_t lo = (first > start ? first : start) - start, hi = (end < stop ? end : stop) - 1 - start;
        if (p->shape_major) {
            if (lo / (height * width) != hi / (height * width)) return 1;
            lo %= height * width;
            hi %= height * width;
        } else {
            lo /= shapes;
            hi /= shapes;
        }
        /* cells lo..hi, row-major: a later row than the valid ones, or a row end past the
         * valid columns (a span over two rows holds its first row's last column) */
        if (hi / width >= valid[0]) return 1;
        if (valid[1] < width && (lo / width != hi / width || hi % width >= valid[1])) return 1;
    }
    return 0;
}

/* Whether anchor a (within the image) lies on a cell beyond the image's valid cells. */
static int outside_padding(const Problem *p, int64_t image, int64_t a) {
    int64_t l = 0;
    while (a >= p->levels[4 * l] + p->levels[4 * l + 1] * p->levels[4 * l + 2] * p->levels[4 * l + 3]) ++l;
    const int64_t *lv = p->levels + 4 * l;
    const int64_t local = a - lv[0], height = lv[1], width = lv[2], shapes = lv[3];
    const int64_t cell = p->shape_major ? local % (height * width) : local / shapes;
    const int32_t *valid = p->valid_cells + 2 * (image * p->num_levels + l);
    return cell / width >= valid[0] || cell % width >= valid[1];
}

/* A chunk of anchors: bounds always, coordinates (structure-of-arrays) of the blocks
 * some step needed, and which anchors are excluded. */
typedef struct {
    int64_t image, start, n;
    int nblocks;
    const float *block_bounds; /* [nblocks][BOUNDS] */
    const float *bounds;       /* [BOUNDS] of the whole chunk */
    unsigned loaded;           /* bit j: block j's coordinates are below */
    unsigned inside;           /* bit j: no anchor of block j is outside the image: all are inside the
                                * border limits (or there are none) and on valid cells */
    float x1[CHUNK], y1[CHUNK], x2[CHUNK], y2[CHUNK], area[CHUNK];
    uint8_t excluded[CHUNK];
} Chunk;

static inline int64_t block_end(const Chunk *c, int j) {
    return (int64_t)(j + 1) * BLOCK < c->n ? (int64_t)(j + 1) * BLOCK : c->n;
}

static void open_chunk(const Problem *p, int64_t image, int64_t chunk, Chunk *c) {
    c->image = image;
    c->start = chunk * CHUNK;
    c->n = (p->num_anchors - c->start) < CHUNK ? (p->num_anchors - c->start) : CHUNK;
    c->nblocks = (int)((c->n + BLOCK - 1) / BLOCK);
    c->block_bounds = p->bounds + BOUNDS * (c->start / BLOCK);
    c->bounds = p->bounds + BOUNDS * ((p->num_anchors + BLOCK - 1) / BLOCK + chunk);
    c->loaded = 0;
    c->inside = (1u << c->nblocks) - 1;
    if (p->border_limits) {
        const float *lim = p->border_limits + 4 * image;
        for (int j = 0; j < c->nblocks; ++j) {
            const float *bb = c->block_bounds + BOUNDS * j; /* the bounds' corners are the extreme anchors' */
            if (!anchor_inside(lim, bb[0], bb[1], bb[2], bb[3])) c->inside &= ~(1u << j);
        }
    }
    if (p->valid_cells)
        for (int j = 0; j < c->nblocks; ++j)
            if (block_may_be_padded(p, image, c->start + (int64_t)j * BLOCK, c->start + block_end(c, j)))
                c->inside &= ~(1u << j);
}

static void load_block(const Problem *p, Chunk *c, int j) {
    if (c->loaded & (1u << j)) return;
    c->loaded |= 1u << j;
    const int64_t k0 = (int64_t)j * BLOCK, k1 = k0 + BLOCK < c->n ? k0 + BLOCK : c->n;
    const float *a = p->anchors + 4 * c->start;
    for (int64_t k = k0; k < k1; ++k) {
        float x1 = a[4 * k], y1 = a[4 * k + 1], x2 = a[4 * k + 2], y2 = a[4 * k + 3];
        c->x1[k] = x1; c->y1[k] = y1; c->x2[k] = x2; c->y2[k] = y2;
        c->area[k] = (x2 - x1) * (y2 - y1);
    }
}

/* Below which IoU box g's IoUs need not be computed in pass 1: those below
 * job->iou_floor decide no label, and those below the box's best IoU found so far (by
 * this thread, or by any thread through box_found: an attained IoU, so a lower bound of
 * its maximum) are not its maximum. */
static inline float box_floor(const Job *job, int thread, int64_t g) {
    if (job->p->low_quality == LQ_NONE) return job->iou_floor;
    union {
        int32_t i;
        float f;
    } shared = {atomic_load_explicit(&job->box_found[g], memory_order_relaxed)};
    const float own = job->partials[thread].max[g];
    const float found = own > shared.f ? own : shared.f;
    return found < job->iou_floor ? found : job->iou_floor;
}

/* ---- the boxes that touch a chunk ---------------------------------------------------------- */

/* A chunk of generated anchors is a strip a few cells high (512 anchors of one level's
 * rows), so of a crowded image's boxes (or ignore regions) only a few touch it. Each image
 * with enough of them has them grouped by the binary exponent of their height, each group
 * sorted by top (y1) with their coordinates beside them: a group's boxes that can reach
 * down to a chunk's top edge are a range of it, found by binary search, read in order.
 * Testing every box against every chunk instead cost 40 s for 100,000 boxes on an
 * 8192 x 8192 canvas (24,600 chunks, twice with low-quality matches), and 22 s for as many
 * ignore regions. Memory: 36 bytes per box, and per thread 4.125 bytes per box of the
 * largest image. */

static int by_top(const void *x, const void *y) {
    const IndexedBox *a = x, *b = y;
    return (a->box[1] > b->box[1]) - (a->box[1] < b->box[1]);
}

static int height_class(double height) {
    int exponent;
    frexp(height, &exponent); /* height in [2^(exponent - 1), 2^exponent) */
    return exponent < 1 ? 0 : exponent >= HEIGHT_CLASSES ? HEIGHT_CLASSES - 1 : exponent;
}

/* Indexes the boxes of every image that has at least INDEX_MIN_BOXES of them, for
 * `threads` threads to list. Returns 0, or 1 when memory ran out (free_index frees what
 * was allocated). */
static int build_index(BoxIndex *index, const float *boxes, const int64_t *offsets, int64_t batch, int threads) {
    index->offsets = offsets;
    const int64_t N = offsets[batch];
    int64_t most = 0;
    for (int64_t image = 0; image < batch; ++image) {
        const int64_t count = offsets[image + 1] - offsets[image];
        most = count > most ? count : most;
    }
    if (most < INDEX_MIN_BOXES) return 0;
    index->most = most;
    index->words = (most + 63) / 64;
    index->by_top = malloc(sizeof(IndexedBox) * (size_t)N);
    index->classes = malloc(sizeof(HeightClass) * (size_t)N);
    index->class_count = calloc((size_t)batch, sizeof(int32_t));
    index->lists = malloc(sizeof(int32_t) * (size_t)(threads * most));
    index->marks = calloc((size_t)(threads * index->words), sizeof(uint64_t));
    if (!(index->by_top && index->classes && index->class_count && index->lists && index->marks)) return 1;
    for (int64_t image = 0; image < batch; ++image) {
        const int64_t g0 = offsets[image], G = offsets[image + 1] - g0;
        if (G < INDEX_MIN_BOXES) continue;
        int64_t end[HEIGHT_CLASSES] = {0};
        double reach[HEIGHT_CLASSES] = {0};
        for (int64_t i = 0; i < G; ++i) {
            const float *b = boxes + 4 * (g0 + i);
            const double height = (double)b[3] - (double)b[1];
            const int k = height_class(height);
            ++end[k];
            reach[k] = height > reach[k] ? height : reach[k];
        }
        for (int k = 1; k < HEIGHT_CLASSES; ++k) end[k] += end[k - 1];
        int64_t at[HEIGHT_CLASSES];
        for (int k = 0; k < HEIGHT_CLASSES; ++k) at[k] = k ? end[k - 1] : 0;
        IndexedBox *sorted = index->by_top + g0;
        for (int64_t i = 0; i < G; ++i) {
            const float *b = boxes + 4 * (g0 + i);
            sorted[at[height_class((double)b[3] - (double)b[1])]++] = (IndexedBox){{b[0], b[1], b[2], b[3]}, (int32_t)i};
        }
        HeightClass *classes = index->classes + g0;
        int32_t count = 0;
        for (int k = 0; k < HEIGHT_CLASSES; ++k) {
            const int64_t begin = k ? end[k - 1] : 0;
            if (begin == end[k]) continue;
            qsort(sorted + begin, (size_t)(end[k] - begin), sizeof(IndexedBox), by_top);
            classes[count++] = (HeightClass){(int32_t)begin, (int32_t)end[k], reach[k]};
        }
        index->class_count[image] = count;
    }
    return 0;
}

static void free_index(BoxIndex *index) {
    free(index->by_top); free(index->classes); free(index->class_count); free(index->lists); free(index->marks);
}

/* The first of entries [begin, end) of a sorted index whose top is at least v. */
static int64_t first_at_least(const IndexedBox *sorted, int64_t begin, int64_t end, double v) {
    while (begin < end) {
        const int64_t mid = begin + (end - begin) / 2;
        if ((double)sorted[mid].box[1] < v) begin = mid + 1;
        else end = mid;
    }
    return begin;
}

/* The boxes of an image that touch bounds (x1, y1, x2, y2: box_misses is false; a box
 * that misses them has IoU and IoF 0 with what lies inside), in box order (image-local
 * indices): their count, and *list, or NULL for all of the image's boxes (an image not
 * indexed, or one where the boxes whose tops are near the bounds' are over a quarter of them: testing
 * each then costs less than listing). */
static int64_t touching(const BoxIndex *index, int thread, int64_t image, const float *bounds, const int32_t **list) {
    const int64_t g0 = index->offsets[image], G = index->offsets[image + 1] - g0;
    const int classes = index->class_count ? index->class_count[image] : 0;
    *list = NULL;
    if (!classes) return G;
    const HeightClass *hc = index->classes + g0;
    const IndexedBox *sorted = index->by_top + g0;
    const double top = bounds[1];
    int64_t lo[HEIGHT_CLASSES], hi[HEIGHT_CLASSES], total = 0;
    for (int k = 0; k < classes; ++k) {
        /* A box whose top is below top - reach ends above top (the margin covers the
         * rounding of the heights and of this sum), a box whose top is at or below the
         * bounds' bottom edge starts below it: both miss. */
        const double margin = (fabs(top) + hc[k].reach) * 0x1p-40;
        lo[k] = first_at_least(sorted, hc[k].begin, hc[k].end, top - hc[k].reach - margin);
        hi[k] = first_at_least(sorted, lo[k], hc[k].end, bounds[3]);
        total += hi[k] - lo[k];
    }
    if (4 * total > G) return G;
    /* The touching boxes' bits, read back in box order and cleared. */
    uint64_t *marks = index->marks + thread * index->words;
    for (int k = 0; k < classes; ++k)
        for (int64_t i = lo[k]; i < hi[k]; ++i)
            if (!box_misses(bounds, sorted[i].box)) marks[sorted[i].index / 64] |= (uint64_t)1 << (sorted[i].index % 64);
    int32_t *out = index->lists + thread * index->most;
    int64_t count = 0;
    for (int64_t w = 0; w < (G + 63) / 64; ++w) {
        for (uint64_t bits = marks[w]; bits; bits &= bits - 1) out[count++] = (int32_t)(64 * w + __builtin_ctzll(bits));
        marks[w] = 0;
    }
    *list = out;
    return count;
}

/* Whether some box (of those touching the chunk: boxes, count), ignore region or border
 * rule of the image changes an anchor of the chunk; when none does, every anchor in it is
 * included and negative (its IoUs are 0 or below job->iou_floor), and no box reaches its
 * maximum there. */
static int chunk_is_touched(const Job *job, int thread, const Chunk *c, const int32_t *boxes, int64_t count) {
    const Problem *p = job->p;
    for (int64_t i = 0; i < count; ++i) {
        const int64_t g = p->gt_offsets[c->image] + (boxes ? boxes[i] : i);
        const float *b = p->gt_boxes + 4 * g;
        if (!box_skips(c->bounds, b, (b[2] - b[0]) * (b[3] - b[1]), box_floor(job, thread, g))) return 1;
    }
    if (p->use_ignore) {
        const int32_t *regions;
        const int64_t n = touching(&job->regions, thread, c->image, c->bounds, &regions);
        for (int64_t i = 0; i < n; ++i) {
            const int64_t m = p->ignore_offsets[c->image] + (regions ? regions[i] : i);
            if (!box_misses(c->bounds, p->ignore_boxes + 4 * m)) return 1;
        }
    }
    return c->inside != (1u << c->nblocks) - 1;
}

/* Anchors taken out before matching: inside an ignore region, with "pre_match" across
 * the border, or on a cell beyond the image's padded size (reference.excluded_by_ignore /
 * outside_border / outside_padding). Only blocks a region touches or the border or the
 * padding crosses can have any. */
static void mark_excluded(const Job *job, int thread, Chunk *c) {
    const Problem *p = job->p;
    memset(c->excluded, 0, (size_t)c->n);
    const int border_pre = p->border_limits && !p->border_post;
    if (border_pre || p->valid_cells) {
        const float *lim = border_pre ? p->border_limits + 4 * c->image : NULL;
        for (int j = 0; j < c->nblocks; ++j) {
            if (c->inside & (1u << j)) continue;
            if (lim) {
                load_block(p, c, j);
                for (int64_t k = (int64_t)j * BLOCK; k < block_end(c, j); ++k)
                    c->excluded[k] = !anchor_inside(lim, c->x1[k], c->y1[k], c->x2[k], c->y2[k]);
            }
            if (p->valid_cells)
                for (int64_t k = (int64_t)j * BLOCK; k < block_end(c, j); ++k)
                    c->excluded[k] |= (uint8_t)outside_padding(p, c->image, c->start + k);
        }
    }
    if (!p->use_ignore) return;
    const int32_t *regions;
    const int64_t n = touching(&job->regions, thread, c->image, c->bounds, &regions);
    for (int64_t i = 0; i < n; ++i) {
        const float *r = p->ignore_boxes + 4 * (p->ignore_offsets[c->image] + (regions ? regions[i] : i));
        if (box_misses(c->bounds, r)) continue; /* IoF 0 never exceeds a threshold >= 0 */
        const float rarea = (r[2] - r[0]) * (r[3] - r[1]);
        for (int j = 0; j < c->nblocks; ++j) {
            if (box_misses(c->block_bounds + BOUNDS * j, r)) continue;
            load_block(p, c, j);
            for (int64_t k = (int64_t)j * BLOCK; k < block_end(c, j); ++k)
                c->excluded[k] |= (uint8_t)iof_exceeds(p, r, rarea, c->x1[k], c->y1[k], c->x2[k], c->y2[k], c->area[k]);
        }
    }
}

/* The class of gt box g, int32 as the outputs hold it (build_problem refused an int64
 * class outside [0, 2^31)). */
static inline int32_t box_class(const Problem *p, int64_t g) {
    return p->gt_classes ? p->gt_classes[g] : (int32_t)p->gt_classes64[g];
}

static void encode_one(const Problem *p, const float *g, const float *anchor, float *out) {
    /* reference.encode / torchvision BoxCoder.encode_boxes, same rounding order */
    float aw = anchor[2] - anchor[0], ah = anchor[3] - anchor[1];
    float acx = anchor[0] + 0.5f * aw, acy = anchor[1] + 0.5f * ah;
    float gw = g[2] - g[0], gh = g[3] - g[1];
    float gcx = g[0] + 0.5f * gw, gcy = g[1] + 0.5f * gh;
    float d[4];
    d[0] = p->weights[0] * (gcx - acx) / aw;
    d[1] = p->weights[1] * (gcy - acy) / ah;
    d[2] = p->weights[2] * logf(gw / aw);
    d[3] = p->weights[3] * logf(gh / ah);
    for (int j = 0; j < 4; ++j) out[j] = (d[j] - p->means[j]) / p->stds[j];
}

/* ---- a chunk's outputs: dense rows, or sparse rows ---------------------------------------- */

/* Dense: write anchors start..start + n of an image from their decided labels and
 * matches; deltas and classes of the positives (zeros and background elsewhere). */
static void write_dense(const Problem *p, int64_t image, int64_t start, int64_t n, const int8_t *label,
                        const int32_t *match) {
    const int64_t row = image * p->num_anchors + start;
    memcpy(p->labels + row, label, (size_t)n);
    memcpy(p->matched + row, match, sizeof(int32_t) * (size_t)n);
    memset(p->deltas + 4 * row, 0, sizeof(float) * 4 * (size_t)n);
    if (p->classes)
        for (int64_t k = 0; k < n; ++k) p->classes[row + k] = p->background_class;
    const int64_t g0 = p->gt_offsets[image];
    for (int64_t k = 0; k < n; ++k) {
        if (label[k] != POSITIVE) continue;
        const int64_t g = g0 + match[k];
        encode_one(p, p->gt_boxes + 4 * g, p->anchors + 4 * (start + k), p->deltas + 4 * (row + k));
        if (p->classes) p->classes[row + k] = box_class(p, g);
    }
}

/* `data` grown to hold `need` items of `size` bytes (its capacity `cap` doubled until they
 * fit), or NULL where that failed: `data` is then untouched, still the caller's. Returned,
 * not stored through a void ** (writing an int32_t * through one breaks strict aliasing). */
static void *grown(void *data, int64_t *cap, int64_t need, size_t size) {
    int64_t room = *cap > 0 ? *cap : 1024;
    while (room < need) room *= 2;
    void *moved = realloc(data, (size_t)room * size);
    if (moved) *cap = room;
    return moved;
}

/* Sparse: append the positives and ignored anchors of a chunk's blocks in `blocks` (every
 * other anchor is negative) to r, and point the item at them. */
static void store_rows(Job *job, Rows *r, const Chunk *c, unsigned blocks, const int8_t *label, const int32_t *match) {
    const int64_t item = c->image * job->chunks_per_image + c->start / CHUNK;
    int32_t npos = 0, nign = 0;
    for (int j = 0; j < c->nblocks; ++j) {
        if (!(blocks & (1u << j))) continue;
        for (int64_t k = (int64_t)j * BLOCK; k < block_end(c, j); ++k) {
            npos += label[k] == POSITIVE;
            nign += label[k] == IGNORED;
        }
    }
    job->items[item] = (ItemRows){r, r->npos, r->nign, npos, nign};
    if (npos == 0 && nign == 0) return;
    if (r->npos + npos > r->pos_cap) {
        PositiveRow *pos = grown(r->pos, &r->pos_cap, r->npos + npos, sizeof *pos);
        if (pos) r->pos = pos;
        else r->failed = 1;
    }
    if (!r->failed && r->nign + nign > r->ign_cap) {
        int32_t *ign = grown(r->ign, &r->ign_cap, r->nign + nign, sizeof *ign);
        if (ign) r->ign = ign;
        else r->failed = 1;
    }
    if (r->failed) {
        job->items[item].npos = job->items[item].nign = 0;
        return;
    }
    for (int j = 0; j < c->nblocks; ++j) {
        if (!(blocks & (1u << j))) continue;
        for (int64_t k = (int64_t)j * BLOCK; k < block_end(c, j); ++k) {
            if (label[k] == POSITIVE) r->pos[r->npos++] = (PositiveRow){(int32_t)(c->start + k), match[k]};
            else if (label[k] == IGNORED) r->ign[r->nign++] = (int32_t)(c->start + k);
        }
    }
}

/* A chunk's current labels and matches (the matches of positives; -1 elsewhere in a
 * sparse solve), for pass 2 and ssd_forced to patch. */
static void read_chunk(const Job *job, const Chunk *c, int8_t *label, int32_t *match) {
    const Problem *p = job->p;
    if (!job->rows) {
        const int64_t row = c->image * p->num_anchors + c->start;
        memcpy(label, p->labels + row, (size_t)c->n);
        memcpy(match, p->matched + row, sizeof(int32_t) * (size_t)c->n);
        return;
    }
    const ItemRows *it = &job->items[c->image * job->chunks_per_image + c->start / CHUNK];
    memset(label, NEGATIVE, (size_t)c->n);
    for (int64_t k = 0; k < c->n; ++k) match[k] = -1;
    for (int32_t i = 0; i < it->npos; ++i) {
        const PositiveRow row = it->rows->pos[it->pos_at + i];
        label[row.anchor - c->start] = POSITIVE;
        match[row.anchor - c->start] = row.box;
    }
    for (int32_t i = 0; i < it->nign; ++i) label[it->rows->ign[it->ign_at + i] - c->start] = IGNORED;
}

/* Anchors with changed[k] became positive (label/match hold the whole patched chunk):
 * rewrite them (dense) or replace the chunk's rows by rows appended to r (sparse). */
static void commit_chunk(Job *job, Rows *r, const Chunk *c, const int8_t *label, const int32_t *match,
                         const uint8_t *changed) {
    if (job->rows) {
        store_rows(job, r, c, (1u << c->nblocks) - 1, label, match);
        return;
    }
    for (int64_t k = 0; k < c->n; ++k)
        if (changed[k]) write_dense(job->p, c->image, c->start + k, 1, label + k, match + k);
}

/* ---- pass 1 --------------------------------------------------------------------------- */

/* Labels and matches of a chunk's blocks in `blocks` (the others are negative) from the
 * thresholds alone (pass 2 adds low-quality lifts), then the "post_match" border rule;
 * written out (dense: every block) or stored as rows. best: each anchor's best IoU;
 * argmax: its best box. */
static void decide_chunk(Job *job, int thread, const Chunk *c, unsigned blocks, const float *best,
                         const int32_t *argmax) {
    const Problem *p = job->p;
    const int no_boxes = p->gt_offsets[c->image + 1] == p->gt_offsets[c->image];
    const int keep_argmax = p->low_quality == LQ_DETECTRON2 && !no_boxes; /* detectron2's Matcher keeps them */
    const float *lim = p->border_limits && p->border_post ? p->border_limits + 4 * c->image : NULL;
    const float high = p->high, low = p->low;
    uint8_t above[BLOCK], below[BLOCK];
    int8_t label[CHUNK];
    int32_t match[CHUNK];
    for (int j = 0; j < c->nblocks; ++j) {
        if (!(blocks & (1u << j))) continue;
        const int64_t k0 = (int64_t)j * BLOCK, m = block_end(c, j) - k0;
        if (no_boxes) { /* included anchors are negative */
            memset(above, 0, BLOCK);
            memset(below, 1, BLOCK);
        } else if (p->strict_high) { /* DALI/MLPerf's single criterion: the interval is (low, high] */
            for (int64_t i = 0; i < m; ++i) {
                above[i] = best[k0 + i] > high;
                below[i] = best[k0 + i] <= low;
            }
        } else {
            for (int64_t i = 0; i < m; ++i) {
                above[i] = best[k0 + i] >= high;
                below[i] = best[k0 + i] < low;
            }
        }
        for (int64_t i = 0; i < m; ++i) {
            const int64_t k = k0 + i;
            uint8_t included = !c->excluded[k];
            uint8_t pos = above[i] & included;
            uint8_t neg = below[i] & included & !pos;
            label[k] = (int8_t)(pos - !(pos | neg)); /* 1, 0, or -1 */
            match[k] = (keep_argmax ? included : label[k] == POSITIVE) ? argmax[k] : -1;
        }
        if (!lim || (c->inside & (1u << j))) continue;
        for (int64_t k = k0; k < k0 + m; ++k) {
            const float *an = p->anchors + 4 * (c->start + k);
            if (anchor_inside(lim, an[0], an[1], an[2], an[3])) continue;
            label[k] = IGNORED;
            if (p->low_quality != LQ_DETECTRON2) match[k] = -1;
        }
    }
    if (job->rows) {
        store_rows(job, &job->rows[thread], c, blocks, label, match);
        return;
    }
    if (p->max_iou) memcpy(p->max_iou + c->image * p->num_anchors + c->start, best, sizeof(float) * (size_t)c->n);
    write_dense(p, c->image, c->start, c->n, label, match);
}

static void pass1_item(Job *job, int thread, int64_t image, int64_t chunk) {
    const Problem *p = job->p;
    const int64_t item = image * job->chunks_per_image + chunk;
    const int64_t g0 = p->gt_offsets[image], g1 = p->gt_offsets[image + 1];
    const int want_box_max = p->low_quality != LQ_NONE;
    BoxPartial part = job->partials[thread];
    Chunk c;
    open_chunk(p, image, chunk, &c);
    const unsigned all = (1u << c.nblocks) - 1;
    /* In a sparse solve where an untouched anchor is negative, only blocks where a box,
     * an ignore region or the border changes something have rows. */
    const int untouched_negative = job->rows && (g0 == g1 || job->zero_label == NEGATIVE);
    const int32_t *boxes;
    const int64_t count = touching(&job->boxes, thread, image, c.bounds, &boxes);
    if (untouched_negative && !chunk_is_touched(job, thread, &c, boxes, count)) {
        job->items[item] = (ItemRows){&job->rows[thread], 0, 0, 0, 0};
        job->chunk_reach[item] = 0.0f; /* no box reaches above 0 here */
        return;
    }
    float best[CHUNK];
    int32_t arg[CHUNK];
    /* IoU of one box over included anchors, -1 for excluded ones. Read back as int32: for
     * -1 and non-negative floats (never NaN, never -0) the bit patterns order like the
     * values, and an integer max vectorises where a float max would need -ffast-math. */
    union {
        float f[CHUNK];
        int32_t i[CHUNK];
    } masked;

    mark_excluded(job, thread, &c); /* loads the blocks where some anchor may be excluded */
    /* live: blocks whose best IoUs are computed (all without the sparse shortcut); decided:
     * blocks where an anchor may not be negative: an exclusion, the border, or an IoU at
     * or above iou_floor */
    unsigned live = untouched_negative ? (c.loaded | ~c.inside) & all : all;
    unsigned decided = live;
    union {
        float f;
        int32_t i;
    } floor_bits = {job->iou_floor};
    /* Box 0 gives every anchor an IoU >= 0 and argmax 0 first, so starting from (0, 0) and
     * skipping the zero IoUs of blocks a box misses (never strictly greater) is the same. */
    for (int j = 0; j < c.nblocks; ++j) {
        if (!(live & (1u << j))) continue;
        for (int64_t k = (int64_t)j * BLOCK; k < block_end(&c, j); ++k) {
            best[k] = 0.0f;
            arg[k] = 0;
        }
    }
    for (int64_t i = 0; i < count; ++i) {
        const int64_t g = g0 + (boxes ? boxes[i] : i);
        const float *b = p->gt_boxes + 4 * g;
        const float bx1 = b[0], by1 = b[1], bx2 = b[2], by2 = b[3];
        const float barea = (bx2 - bx1) * (by2 - by1);
        const float floor = box_floor(job, thread, g);
        if (box_skips(c.bounds, b, barea, floor)) continue;
        const int32_t local = (int32_t)(g - g0);
        int32_t top = 0; /* bits of 0.0f: only a box's maxima above 0 matter (box_qualifies) */
        int top_block = -1;
        for (int j = 0; j < c.nblocks; ++j) {
            if (box_skips(c.block_bounds + BOUNDS * j, b, barea, floor)) continue;
            load_block(p, &c, j);
            const int64_t k0 = (int64_t)j * BLOCK, k1 = block_end(&c, j);
            if (!(live & (1u << j))) {
                live |= 1u << j;
                for (int64_t k = k0; k < k1; ++k) {
                    best[k] = 0.0f;
                    arg[k] = 0;
                }
            }
            int32_t block_top = -1;
            for (int64_t k = k0; k < k1; ++k) {
                float v = iou_one(bx1, by1, bx2, by2, barea, c.x1[k], c.y1[k], c.x2[k], c.y2[k], c.area[k]);
                int up = v > best[k];
                best[k] = up ? v : best[k];
                arg[k] = up ? local : arg[k];
                masked.f[k] = c.excluded[k] ? -1.0f : v;
                block_top = masked.i[k] > block_top ? masked.i[k] : block_top;
            }
            if (block_top >= floor_bits.i) decided |= 1u << j;
            if (block_top > top) {
                top = block_top;
                top_block = j;
            }
        }
        if (!want_box_max || top_block < 0) continue;
        union {
            int32_t i;
            float f;
        } as_float = {top};
        /* Greater or equal: this thread sees its items in decreasing anchor order, so an
         * equal value found later has the lower index (the merge settles other ties). */
        if (as_float.f >= part.max[g]) {
            int64_t k = (int64_t)top_block * BLOCK;
            while (masked.i[k] != top) ++k;
            part.max[g] = as_float.f;
            part.best[g] = (int32_t)(c.start + k);
            int32_t shared = atomic_load_explicit(&job->box_found[g], memory_order_relaxed);
            while (top > shared && !atomic_compare_exchange_weak_explicit(&job->box_found[g], &shared, top,
                                                                          memory_order_relaxed, memory_order_relaxed)) {
            }
        }
    }

    float reach = 0.0f; /* an anchor outside the live blocks is included with IoU 0 */
    for (int j = 0; j < c.nblocks; ++j) {
        if (!(live & (1u << j))) continue;
#pragma omp simd reduction(max : reach)
        for (int64_t k = (int64_t)j * BLOCK; k < block_end(&c, j); ++k) {
            float r = c.excluded[k] ? -1.0f : best[k];
            reach = r > reach ? r : reach;
        }
    }
    job->chunk_reach[item] = reach;
    decide_chunk(job, thread, &c, decided, best, arg);
}

/* ---- pass 2: low-quality lifts ------------------------------------------------------- */

/* Of the chunk's image's boxes (image-local indices: those listed in from, or all of
 * them when from is NULL), those that touch bounds, in box order, into out; their count. */
static int64_t touching_boxes(const Problem *p, const Chunk *c, const float *bounds, const int32_t *from,
                              int64_t from_count, int32_t *out) {
    const int64_t g0 = p->gt_offsets[c->image];
    const int64_t n = from ? from_count : p->gt_offsets[c->image + 1] - g0;
    int64_t count = 0;
    for (int64_t i = 0; i < n; ++i) {
        const int32_t local = from ? from[i] : (int32_t)i;
        if (!box_misses(bounds, p->gt_boxes + 4 * (g0 + local))) out[count++] = local;
    }
    return count;
}

/* An anchor's best box, as pass 1 found it (same IoUs, same strictly-greater order),
 * among the boxes touching its chunk (near, in box order). Starting from (0, box 0) is
 * what box 0 gives at worst, and a box that does not touch the anchor has IoU 0, which
 * never beats it: such boxes are skipped. */
static int32_t best_box(const Problem *p, const Chunk *c, int64_t k, const int32_t *near, int64_t count) {
    const int64_t g0 = p->gt_offsets[c->image];
    float top = 0.0f;
    int32_t at = 0;
    for (int64_t i = 0; i < count; ++i) {
        const int64_t g = g0 + near[i];
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

/* Whether box g takes part in low-quality matching: its best IoU is above 0 (a box
 * touching no included anchor lifts nothing) and reaches min_pos_iou. */
static int box_qualifies(const Job *job, int64_t g) {
    const float target = job->box_max[g];
    return target > 0.0f && target >= job->p->min_pos_iou;
}

/* Box g lifts the included anchors whose IoU with it equals its best IoU (when it
 * qualifies). None in a chunk can, when the chunk's best IoU is lower. */
static int box_may_lift(const Job *job, int64_t g, float reach) {
    return box_qualifies(job, g) && job->box_max[g] <= reach;
}

static void pass2_item(Job *job, int thread, int64_t image, int64_t chunk) {
    const Problem *p = job->p;
    const int64_t g0 = p->gt_offsets[image];
    const float reach = job->chunk_reach[image * job->chunks_per_image + chunk];
    if (reach <= 0.0f) return; /* the usual case: no box's best IoU is this chunk's (box_may_lift) */

    Chunk c;
    open_chunk(p, image, chunk, &c);
    const int32_t *boxes;
    const int64_t count = touching(&job->boxes, thread, image, c.bounds, &boxes);
    uint8_t lifted[CHUNK];
    int32_t lift_box[CHUNK];
    unsigned tied = 0; /* blocks with a lifted anchor */
    int prepared = 0;
    for (int64_t i = 0; i < count; ++i) {
        const int64_t g = g0 + (boxes ? boxes[i] : i);
        if (!box_may_lift(job, g, reach)) continue;
        const float *b = p->gt_boxes + 4 * g;
        const float bx1 = b[0], by1 = b[1], bx2 = b[2], by2 = b[3];
        const float barea = (bx2 - bx1) * (by2 - by1);
        const float target = job->box_max[g];
        if (box_skips(c.bounds, b, barea, target)) continue; /* only IoUs equal to target > 0 matter */
        if (!prepared) {
            prepared = 1;
            mark_excluded(job, thread, &c);
            memset(lifted, 0, (size_t)c.n);
        }
        const int32_t local = (int32_t)(g - g0);
        for (int j = 0; j < c.nblocks; ++j) {
            if (box_skips(c.block_bounds + BOUNDS * j, b, barea, target)) continue;
            load_block(p, &c, j);
            uint8_t any = 0;
            for (int64_t k = (int64_t)j * BLOCK; k < block_end(&c, j); ++k) {
                float v = iou_one(bx1, by1, bx2, by2, barea, c.x1[k], c.y1[k], c.x2[k], c.y2[k], c.area[k]);
                uint8_t tie = (v == target) & !c.excluded[k];
                lifted[k] |= tie;
                lift_box[k] = tie ? local : lift_box[k]; /* mmdet: the later box overwrites */
                any |= tie;
            }
            tied |= (unsigned)any << j;
        }
    }
    if (!tied) return;

    int8_t label[CHUNK];
    int32_t match[CHUNK];
    uint8_t changed[CHUNK];
    int any_change = 0;
    /* The boxes touching the chunk, then those touching a block: listed on the first lift
     * that needs them (in a crowded image a chunk's list alone left most of the time in
     * best_box). */
    const int64_t N = p->gt_offsets[p->batch];
    int32_t *near = job->near ? job->near + 2 * (int64_t)thread * N : NULL, *block_near = near ? near + N : NULL;
    int64_t near_count = -1;
    read_chunk(job, &c, label, match);
    memset(changed, 0, (size_t)c.n);
    const float *lim = p->border_limits && p->border_post ? p->border_limits + 4 * image : NULL;
    for (int j = 0; j < c.nblocks; ++j) {
        if (!(tied & (1u << j))) continue;
        int64_t block_count = -1;
        for (int64_t k = (int64_t)j * BLOCK; k < block_end(&c, j); ++k) {
            if (!lifted[k]) continue;
            if (lim && !anchor_inside(lim, c.x1[k], c.y1[k], c.x2[k], c.y2[k])) continue; /* stays ignored */
            const int was_positive = label[k] == POSITIVE;
            int32_t m;
            if (p->low_quality == LQ_MMDET) { /* matched to the box it ties (the last one) */
                m = lift_box[k];
                if (was_positive && match[k] == m) continue;
            } else { /* torchvision / detectron2: matched to its own best box */
                if (was_positive) continue;
                if (block_count < 0) {
                    if (near_count < 0) near_count = touching_boxes(p, &c, c.bounds, boxes, count, near);
                    block_count = touching_boxes(p, &c, c.block_bounds + BOUNDS * j, near, near_count, block_near);
                }
                m = best_box(p, &c, k, block_near, block_count);
            }
            label[k] = POSITIVE;
            match[k] = m;
            changed[k] = 1;
            any_change = 1;
        }
    }
    if (any_change)
        commit_chunk(job, job->rows ? &job->rows[job->threads + thread] : NULL, &c, label, match, changed);
}

/* ---- ssd_forced ----------------------------------------------------------------------- */

typedef struct {
    int64_t anchor, box;
} Forced;

static int by_anchor_then_box(const void *x, const void *y) {
    const Forced *a = x, *b = y;
    if (a->anchor != b->anchor) return a->anchor < b->anchor ? -1 : 1;
    return (a->box > b->box) - (a->box < b->box);
}

/* Each qualifying box's best anchor becomes positive, matched to it; a later box wins an
 * anchor two boxes share. Sorted by (anchor, box), every chunk is patched once, and
 * equal anchors come in box order, so the last write is the later box's. */
static int apply_forced(Job *job) {
    const Problem *p = job->p;
    const int64_t N = p->gt_offsets[p->batch];
    Forced *forced = malloc(sizeof(Forced) * (size_t)(N + 1));
    if (!forced) return 1;
    for (int64_t image = 0; image < p->batch; ++image) {
        const int64_t g0 = p->gt_offsets[image];
        int64_t count = 0;
        for (int64_t g = g0; g < p->gt_offsets[image + 1]; ++g) {
            const int64_t a = job->box_best[g];
            if (!box_qualifies(job, g)) continue; /* its best anchor is included: pass 1's maxima skip the others */
            const float *an = p->anchors + 4 * a;
            if (p->border_limits && p->border_post && !anchor_inside(p->border_limits + 4 * image, an[0], an[1], an[2], an[3]))
                continue; /* stays ignored */
            forced[count++] = (Forced){a, g - g0};
        }
        qsort(forced, (size_t)count, sizeof(Forced), by_anchor_then_box);
        for (int64_t i = 0; i < count;) {
            Chunk c;
            int8_t label[CHUNK];
            int32_t match[CHUNK];
            uint8_t changed[CHUNK];
            open_chunk(p, image, forced[i].anchor / CHUNK, &c);
            read_chunk(job, &c, label, match);
            memset(changed, 0, (size_t)c.n);
            for (; i < count && forced[i].anchor < c.start + c.n; ++i) {
                const int64_t k = forced[i].anchor - c.start;
                label[k] = POSITIVE;
                match[k] = (int32_t)forced[i].box;
                changed[k] = 1;
            }
            commit_chunk(job, job->rows ? &job->rows[job->threads] : NULL, &c, label, match, changed);
        }
    }
    free(forced);
    return 0;
}

/* ---- threads -------------------------------------------------------------------------- */

/* Items a thread takes at a time: most items of a sparse solve are skipped in a few
 * nanoseconds, less than an atomic increment and a division cost. */
#define ITEMS_PER_TAKE 8

static void *worker_main(void *arg) {
    Worker *w = (Worker *)arg;
    Job *job = w->job;
    const int64_t chunks = job->chunks_per_image;
    for (;;) {
        const int64_t first = atomic_fetch_add(&job->next_item, ITEMS_PER_TAKE);
        if (first >= job->num_items) break;
        const int64_t last = first + ITEMS_PER_TAKE < job->num_items ? first + ITEMS_PER_TAKE : job->num_items;
        int64_t image = first / chunks, chunk = first % chunks;
        for (int64_t item = first; item < last; ++item) {
            /* Each thread meets an image's chunks in decreasing anchor order: generated
             * anchors come in levels from small to large, and a box's best IoU is usually
             * with larger anchors than most it touches, so seeing those first lets pass 1
             * skip the rest sooner. */
            w->body(job, w->thread, image, chunks - 1 - chunk);
            if (++chunk == chunks) {
                chunk = 0;
                ++image;
            }
        }
    }
    return NULL;
}

/* Helper threads outlive a call: creating and joining a thread costs ~35 us on a 2-core
 * VM, three times per call (pass 1, pass 2, emit), against ~0.3 ms for a whole sparse
 * solve of a COCO-like image. Idle helpers wait on their own condition variable; a call
 * takes as many as it needs (starting new ones when none is idle, so concurrent calls
 * never wait for each other) and works on its own thread too. The helpers are at most as
 * many as the machine has CPUs: concurrent callers each asking for many threads had
 * started one per thread asked for (16 Python threads with 16 each: 240 helpers, kept for
 * the process's life), and past one per CPU a helper only takes another's turn; a call
 * that finds none idle then shares its work among the threads it has. A forked child
 * (data-loader workers) has none of the parent's helpers: it starts with an empty pool. */
typedef struct Helper {
    pthread_cond_t wake;
    Worker *work;        /* set by the caller, cleared by the helper when its share is done */
    struct Helper *next; /* in the idle list */
} Helper;

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_done = PTHREAD_COND_INITIALIZER; /* a helper finished a share */
static Helper *pool_idle;
static int pool_started; /* helpers started, at most pool_cap() */

static int pool_cap(void) {
    static int cap;
    if (!cap) {
        const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        cap = cpus > 0 ? (int)cpus : 1;
    }
    return cap;
}

static void *helper_main(void *arg) {
    Helper *h = (Helper *)arg;
#if defined(__linux__)
    prctl(PR_SET_NAME, "tritarget-cpu"); /* as top -H and /proc/PID/task/TID/comm show it */
#endif
    pthread_mutex_lock(&pool_lock);
    for (;;) {
        while (!h->work) pthread_cond_wait(&h->wake, &pool_lock);
        Worker *w = h->work;
        pthread_mutex_unlock(&pool_lock);
        worker_main(w);
        pthread_mutex_lock(&pool_lock);
        h->work = NULL;
        h->next = pool_idle;
        pool_idle = h;
        if (--*w->running == 0) pthread_cond_broadcast(&pool_done);
    }
    return NULL;
}

/* An idle helper, or a new one; NULL when pool_cap() are busy or no thread can be
 * started. pool_lock held. */
static Helper *take_helper(void) {
    Helper *h = pool_idle;
    if (h) {
        pool_idle = h->next;
        return h;
    }
    if (pool_started >= pool_cap()) return NULL;
    h = calloc(1, sizeof(Helper));
    if (!h) return NULL;
    pthread_t id;
    pthread_attr_t attr;
    int started = 0;
    if (pthread_cond_init(&h->wake, NULL) == 0) {
        if (pthread_attr_init(&attr) == 0) {
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            started = pthread_create(&id, &attr, helper_main, h) == 0;
            pthread_attr_destroy(&attr);
        }
        if (!started) pthread_cond_destroy(&h->wake);
    }
    if (!started) {
        free(h);
        return NULL;
    }
    ++pool_started;
    return h;
}

/* The forking thread holds pool_lock across fork(), so the child's copy is in a known
 * state (locked by the one thread the child has) rather than whatever a helper left. */
static void lock_pool(void) { pthread_mutex_lock(&pool_lock); }

static void unlock_pool(void) { pthread_mutex_unlock(&pool_lock); }

static void forget_helpers(void) {
    pool_idle = NULL; /* the parent's helpers do not exist here (their memory is left) */
    pool_started = 0;
    pthread_cond_init(&pool_done, NULL); /* its waiters were the parent's threads */
    pthread_mutex_unlock(&pool_lock);
}

__attribute__((constructor)) static void register_fork_handler(void) {
    pthread_atfork(lock_pool, unlock_pool, forget_helpers);
}

static void run_parallel(Job *job, int threads, void (*body)(Job *, int, int64_t, int64_t)) {
    Worker workers[threads];
    int running = 0;
    atomic_store(&job->next_item, 0);
    for (int t = 0; t < threads; ++t) workers[t] = (Worker){job, t, body, &running};
    pthread_mutex_lock(&pool_lock);
    for (int t = 1; t < threads; ++t) {
        Helper *h = take_helper();
        if (!h) break; /* the threads that did start take its share */
        h->work = &workers[t];
        ++running;
        pthread_cond_signal(&h->wake);
    }
    pthread_mutex_unlock(&pool_lock);
    worker_main(&workers[0]);
    pthread_mutex_lock(&pool_lock);
    while (running) pthread_cond_wait(&pool_done, &pool_lock);
    pthread_mutex_unlock(&pool_lock);
}

/* ---- one solve ------------------------------------------------------------------------ */

/* What IoU 0 makes an included anchor (the thresholds' rule, as decide_chunk applies it). */
static int8_t label_of_zero_iou(const Problem *p) {
    const int above = p->strict_high ? 0.0f > p->high : 0.0f >= p->high;
    const int below = p->strict_high ? 0.0f <= p->low : 0.0f < p->low;
    return above ? POSITIVE : below ? NEGATIVE : IGNORED;
}

static void free_job(Job *job) {
    if (!job) return;
    if (job->rows)
        for (int t = 0; t < 2 * job->threads; ++t) {
            free(job->rows[t].pos);
            free(job->rows[t].ign);
        }
    free(job->partials); free(job->part_max); free(job->part_best); free(job->box_found); free(job->box_max); free(job->box_best); free(job->chunk_reach);
    free_index(&job->boxes); free_index(&job->regions);
    free(job->near); free(job->rows); free(job->items); free(job->pos_start); free(job->ign_start);
    free(job);
}

/* A job with its scratch (and, when sparse, its rows); NULL when memory ran out. */
static Job *new_job(const Problem *p, int sparse) {
    const int64_t A = p->num_anchors, B = p->batch, N = p->gt_offsets[B];
    const int64_t chunks = (A + CHUNK - 1) / CHUNK;
    Job *job = calloc(1, sizeof(Job));
    if (!job) return NULL;
    int threads = p->num_threads > 0 ? p->num_threads : 1;
    if (chunks * B < threads) threads = (int)(chunks * B > 0 ? chunks * B : 1);
    job->p = p;
    job->threads = threads;
    job->chunks_per_image = chunks;
    job->num_items = chunks * B;
    job->zero_label = label_of_zero_iou(p);
    /* Only an anchor's best IoU at or above both thresholds changes its label (below them
     * it is negative, excluded or not). Its exact value is an output with max_iou, and
     * its box with detectron2's dense matches. */
    const int exact = !sparse && (p->max_iou || p->low_quality == LQ_DETECTRON2);
    const float threshold = p->low < p->high ? p->low : p->high;
    job->iou_floor = exact || threshold < 0.0f ? 0.0f : threshold;
    job->partials = malloc(sizeof(BoxPartial) * (size_t)threads);
    job->part_max = malloc(sizeof(float) * (size_t)(threads * N + 1));
    job->part_best = malloc(sizeof(int32_t) * (size_t)(threads * N + 1));
    job->box_found = calloc((size_t)(N + 1), sizeof(atomic_int));
    job->box_max = malloc(sizeof(float) * (size_t)(N + 1));
    job->box_best = malloc(sizeof(int32_t) * (size_t)(N + 1));
    job->chunk_reach = malloc(sizeof(float) * (size_t)(job->num_items + 1));
    int ok = job->partials && job->part_max && job->part_best && job->box_found && job->box_max && job->box_best &&
             job->chunk_reach;
    if (ok && (p->low_quality == LQ_TORCHVISION || p->low_quality == LQ_DETECTRON2)) {
        job->near = malloc(sizeof(int32_t) * (size_t)(2 * threads * N + 1));
        ok = job->near != NULL;
    }
    if (ok && sparse) {
        job->rows = calloc((size_t)(2 * threads), sizeof(Rows));
        job->items = malloc(sizeof(ItemRows) * (size_t)(job->num_items + 1));
        job->pos_start = malloc(sizeof(int64_t) * (size_t)(job->num_items + 1));
        job->ign_start = malloc(sizeof(int64_t) * (size_t)(job->num_items + 1));
        ok = job->rows && job->items && job->pos_start && job->ign_start;
    }
    if (ok) ok = !build_index(&job->boxes, p->gt_boxes, p->gt_offsets, B, threads);
    if (ok && p->use_ignore) ok = !build_index(&job->regions, p->ignore_boxes, p->ignore_offsets, B, threads);
    if (!ok) {
        free_job(job);
        return NULL;
    }
    for (int64_t j = 0; j < threads * N; ++j) {
        job->part_max[j] = -1.0f; /* nothing above 0 seen yet */
        job->part_best[j] = 0;
    }
    for (int t = 0; t < threads; ++t)
        job->partials[t] = (BoxPartial){job->part_max + t * N, job->part_best + t * N};
    return job;
}

/* Pass 1, merge, pass 2, ssd_forced. Returns 0, or 1 when memory ran out. */
static int run_passes(Job *job) {
    const Problem *p = job->p;
    const int64_t N = p->gt_offsets[p->batch];
    if (p->num_anchors == 0) return 0;
    run_parallel(job, job->threads, pass1_item);

    /* merge: best IoU per box, lowest anchor index among equal maxima */
    for (int64_t g = 0; g < N; ++g) {
        float m = -1.0f;
        int32_t at = 0;
        for (int t = 0; t < job->threads; ++t) {
            float v = job->partials[t].max[g];
            int32_t i = job->partials[t].best[g];
            if (v > m || (v == m && i < at)) { m = v; at = i; }
        }
        job->box_max[g] = m;
        job->box_best[g] = at;
    }

    const int lifts = p->low_quality == LQ_TORCHVISION || p->low_quality == LQ_DETECTRON2 ||
                      p->low_quality == LQ_MMDET;
    if (lifts) run_parallel(job, job->threads, pass2_item);
    if (p->low_quality == LQ_SSD_FORCED && apply_forced(job)) return 1;
    if (job->rows)
        for (int t = 0; t < 2 * job->threads; ++t)
            if (job->rows[t].failed) return 1;
    return 0;
}

/* ---- entry points --------------------------------------------------------------------- */

static void bounds_of(const float *anchors, int64_t n, float *out) {
    float lo_x = INFINITY, lo_y = INFINITY, hi_x = -INFINITY, hi_y = -INFINITY;
    float lo_area = INFINITY, hi_area = -INFINITY;
    /* Vectorised (0.23 -> 0.11 ms for 200k anchors, computed on each call for explicit
     * ones): the anchors are finite, so the order of the minima and maxima changes none. */
#pragma omp simd reduction(min : lo_x, lo_y, lo_area) reduction(max : hi_x, hi_y, hi_area)
    for (int64_t k = 0; k < n; ++k) {
        const float *a = anchors + 4 * k;
        const float area = (a[2] - a[0]) * (a[3] - a[1]);
        lo_x = a[0] < lo_x ? a[0] : lo_x;
        lo_y = a[1] < lo_y ? a[1] : lo_y;
        hi_x = a[2] > hi_x ? a[2] : hi_x;
        hi_y = a[3] > hi_y ? a[3] : hi_y;
        lo_area = area < lo_area ? area : lo_area;
        hi_area = area > hi_area ? area : hi_area;
    }
    out[0] = lo_x; out[1] = lo_y; out[2] = hi_x; out[3] = hi_y; out[4] = lo_area; out[5] = hi_area;
}

/* Whether every box (x1, y1, x2, y2) is valid by tritarget.kernels.problem's rule: width
 * and height in (0, inf) taken in double (the exact sign of a float32 difference, no
 * overflow; false for NaN and for infinite coordinates), x2 and y2 above low, x1 below
 * width and y1 below height (float32 compares, as torch compares a float32 tensor with
 * the canvas), every coordinate within (-reach, reach). Anchors pass low = -inf and
 * width = height = reach = inf. */
int tritarget_cpu_boxes_valid(const float *boxes, int64_t count, float low, float width, float height,
                              float reach) {
    /* Runs of boxes tested without a branch, so that the loop vectorises: explicit anchors
     * are checked on every call (200k RetinaNet anchors: 0.8 ms a box at a time). The
     * double width is in (0, inf) exactly where both coordinates are finite and x2 > x1. */
    for (int64_t start = 0; start < count; start += VALID_RUN) {
        const int64_t end = count - start < VALID_RUN ? count : start + VALID_RUN;
        int valid = 1;
#pragma omp simd reduction(& : valid)
        for (int64_t i = start; i < end; ++i) {
            const float *b = boxes + 4 * i;
            valid &= (fabsf(b[0]) < INFINITY) & (fabsf(b[1]) < INFINITY) & (fabsf(b[2]) < INFINITY) &
                     (fabsf(b[3]) < INFINITY) & (b[2] > b[0]) & (b[3] > b[1]) & (b[2] > low) & (b[3] > low) &
                     (b[0] < width) & (b[1] < height) & (b[0] > -reach) & (b[1] > -reach) & (b[2] < reach) &
                     (b[3] < reach);
        }
        if (!valid) return 0;
    }
    return 1;
}

/* The bounds (min x1, min y1, max x2, max y2, least and greatest area) of each block of
 * 64 anchors, then of each chunk of 512; out: [ceil(A / 64) + ceil(A / 512), 6].
 * Computed once per generated anchor set, and on each call for explicit anchors (it reads
 * every anchor, which costs more than a sparse solve of a COCO-like image). */
void tritarget_cpu_bounds(const float *anchors, int64_t num_anchors, float *out) {
    const int64_t blocks = (num_anchors + BLOCK - 1) / BLOCK;
    for (int64_t s = 0; s < num_anchors; s += BLOCK)
        bounds_of(anchors + 4 * s, num_anchors - s < BLOCK ? num_anchors - s : BLOCK, out + BOUNDS * (s / BLOCK));
    /* A chunk's bounds from its blocks' (the same minima and maxima), not a second read
     * of its anchors: explicit anchors' bounds are computed on every call. */
    for (int64_t b = 0; b < blocks; b += CHUNK / BLOCK) {
        const float *block = out + BOUNDS * b;
        float *chunk = out + BOUNDS * (blocks + b / (CHUNK / BLOCK));
        for (int k = 0; k < BOUNDS; ++k) chunk[k] = block[k];
        for (int64_t j = b + 1; j < blocks && j < b + CHUNK / BLOCK; ++j) {
            block = out + BOUNDS * j;
            chunk[0] = block[0] < chunk[0] ? block[0] : chunk[0];
            chunk[1] = block[1] < chunk[1] ? block[1] : chunk[1];
            chunk[2] = block[2] > chunk[2] ? block[2] : chunk[2];
            chunk[3] = block[3] > chunk[3] ? block[3] : chunk[3];
            chunk[4] = block[4] < chunk[4] ? block[4] : chunk[4];
            chunk[5] = block[5] > chunk[5] ? block[5] : chunk[5];
        }
    }
}

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

/* Whether the gt boxes are to be checked here and some box is invalid. */
static int invalid_gt_boxes(const Problem *p) {
    return p->check_gt_boxes &&
           !tritarget_cpu_boxes_valid(p->gt_boxes, p->gt_offsets[p->batch], 0.0f, p->canvas_width, p->canvas_height,
                                      BOX_REACH);
}

/* Dense targets into p's outputs. Returns 0 on success, 1 when scratch memory could not
 * be allocated, 2 when a gt box is invalid (check_gt_boxes; nothing written). */
int tritarget_cpu_solve(const Problem *p) {
    if (invalid_gt_boxes(p)) return 2;
    Job *job = new_job(p, 0);
    if (!job) return 1;
    const size_t cells = (size_t)(p->num_anchors * p->batch);
    advise_huge_pages(p->labels, cells);
    advise_huge_pages(p->matched, cells * sizeof(int32_t));
    advise_huge_pages(p->deltas, cells * 4 * sizeof(float));
    if (p->classes) advise_huge_pages(p->classes, cells * sizeof(int32_t));
    if (p->max_iou) advise_huge_pages(p->max_iou, cells * sizeof(float));
    const int failed = run_passes(job);
    free_job(job);
    return failed;
}

/* The sparse form, first half: solves, writes totals[2] (how many positives and ignored
 * anchors: the sizes of the outputs) and returns the solved job for
 * tritarget_cpu_emit_sparse, which the caller must call once (or tritarget_cpu_free_sparse)
 * while p and its inputs are alive. NULL when memory ran out, or with totals[0] = -1 when
 * a gt box is invalid (check_gt_boxes). */
Job *tritarget_cpu_solve_sparse(const Problem *p, int64_t *totals) {
    if (invalid_gt_boxes(p)) {
        totals[0] = -1;
        return NULL;
    }
    Job *job = new_job(p, 1);
    if (!job) return NULL;
    if (run_passes(job)) {
        free_job(job);
        return NULL;
    }
    int64_t pos = 0, ign = 0;
    for (int64_t item = 0; item < job->num_items; ++item) {
        job->pos_start[item] = pos;
        job->ign_start[item] = ign;
        pos += job->items[item].npos;
        ign += job->items[item].nign;
    }
    job->pos_start[job->num_items] = totals[0] = pos;
    job->ign_start[job->num_items] = totals[1] = ign;
    return job;
}

static void emit_item(Job *job, int thread, int64_t image, int64_t chunk) {
    (void)thread;
    const Problem *p = job->p;
    const int64_t item = image * job->chunks_per_image + chunk;
    const ItemRows *it = &job->items[item];
    const int64_t g0 = p->gt_offsets[image];
    int64_t o = job->pos_start[item];
    for (int32_t i = 0; i < it->npos; ++i, ++o) {
        const PositiveRow row = it->rows->pos[it->pos_at + i];
        job->out_pos_anchors[o] = row.anchor;
        job->out_pos_matched[o] = row.box;
        encode_one(p, p->gt_boxes + 4 * (g0 + row.box), p->anchors + 4 * row.anchor, job->out_pos_deltas + 4 * o);
        if (job->out_pos_classes) job->out_pos_classes[o] = box_class(p, g0 + row.box);
    }
    if (it->nign)
        memcpy(job->out_ign_anchors + job->ign_start[item], it->rows->ign + it->ign_at, sizeof(int32_t) * (size_t)it->nign);
}

/* The sparse form, second half: each image's row offsets (pos_offsets/ign_offsets [B + 1]:
 * image i owns rows [off[i], off[i + 1]) of the positive/ignored outputs), then every
 * image's positives (anchor, matched box, deltas, class) and ignored anchors, ascending
 * anchor index within an image, into outputs sized by the totals; pos_classes is NULL when
 * there are no classes. Frees the job. The offsets are written here, not by the solve, so
 * that the caller makes all its output tensors in one go after the solve (in a line
 * profile of one-image calls, a call's first torch allocation took 1.6-2.6x the next ones). */
void tritarget_cpu_emit_sparse(Job *job, int64_t *pos_offsets, int64_t *ign_offsets, int32_t *pos_anchors,
                               int32_t *pos_matched, float *pos_deltas, int32_t *pos_classes, int32_t *ign_anchors) {
    for (int64_t image = 0; image <= job->p->batch; ++image) {
        const int64_t item = image * job->chunks_per_image; /* num_items for the end; 0 without anchors */
        pos_offsets[image] = job->pos_start[item];
        ign_offsets[image] = job->ign_start[item];
    }
    job->out_pos_anchors = pos_anchors;
    job->out_pos_matched = pos_matched;
    job->out_pos_deltas = pos_deltas;
    job->out_pos_classes = pos_classes;
    job->out_ign_anchors = ign_anchors;
    int64_t rows = 0;
    for (int t = 0; t < 2 * job->threads; ++t) rows += job->rows[t].npos + job->rows[t].nign;
    const int64_t wanted = 1 + rows / EMIT_ROWS_PER_THREAD;
    run_parallel(job, wanted < job->threads ? (int)wanted : job->threads, emit_item);
    free_job(job);
}

/* Frees a job from tritarget_cpu_solve_sparse without emitting it. */
void tritarget_cpu_free_sparse(Job *job) { free_job(job); }
