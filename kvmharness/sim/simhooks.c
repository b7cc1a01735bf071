/* The simulator's IN/OUT instruction hooks in C (issue 15 item 4).
 *
 * Plain C: no Python headers, no unicorn headers.  unicorn 2.1.4 calls an
 * UC_HOOK_INSN hook for OUT as uc_cb_insn_out_t (uc_engine *, uint32_t port,
 * int size, uint32_t value, void *user_data) and for IN as uc_cb_insn_in_t
 * (uc_engine *, uint32_t port, int size, void *user_data) returning the value
 * the IN reads.  A hook here records the access and the registers the model
 * reads at the instruction (RIP; RAX, RCX, RSI, RDI for IN/INS) into the
 * struct passed as user_data, and asks the engine to stop; the model handles
 * the exit after uc_emu_start returns (sim/core.py Core.start), instead of in
 * a Python callback.  The unicorn entry points and register ids are passed in
 * (sim/simhooks.py), so this library links against nothing.
 */
#include <stdint.h>

typedef int (*sh_reg_read_fn)(void *uc, int regid, void *value);
typedef int (*sh_reg_write_fn)(void *uc, int regid, const void *value);
typedef int (*sh_emu_stop_fn)(void *uc);

enum { SH_NONE = 0, SH_OUT = 1, SH_IN = 2 };

struct sh_io {
    sh_reg_read_fn reg_read;
    sh_emu_stop_fn emu_stop;
    sh_reg_write_fn reg_write;
    int32_t id_rip, id_rax, id_rcx, id_rsi, id_rdi, reserved;
    uint64_t rip, rax, rcx, rsi, rdi;   /* at the hook */
    uint64_t after[5];                  /* where the stop left them (sh_show_hook) */
    uint32_t pending;   /* SH_NONE, SH_OUT or SH_IN */
    uint32_t port;
    int32_t size;
    uint32_t value;
    uint64_t hooks;     /* accesses recorded */
    uint64_t overruns;  /* an access while one was still pending (never expected) */
};

int sh_abi(void) { return 3; }

uint64_t sh_sizeof(void) { return sizeof(struct sh_io); }

static void record(struct sh_io *s, void *uc, uint32_t kind, uint32_t port, int size, uint32_t value)
{
    if (s->pending != SH_NONE)
        s->overruns++;
    s->reg_read(uc, s->id_rip, &s->rip);
    s->pending = kind;
    s->port = port;
    s->size = size;
    s->value = value;
    s->hooks++;
}

void sh_out(void *uc, uint32_t port, int size, uint32_t value, void *user_data)
{
    struct sh_io *s = user_data;
    record(s, uc, SH_OUT, port, size, value);
    s->emu_stop(uc);
}

uint32_t sh_in(void *uc, uint32_t port, int size, void *user_data)
{
    struct sh_io *s = user_data;
    record(s, uc, SH_IN, port, size, 0);
    s->reg_read(uc, s->id_rax, &s->rax);
    s->reg_read(uc, s->id_rcx, &s->rcx);
    s->reg_read(uc, s->id_rsi, &s->rsi);
    s->reg_read(uc, s->id_rdi, &s->rdi);
    s->emu_stop(uc);
    return 0;  /* what the Python hook returns: the model completes the IN later */
}

/* Show the engine's registers as they stood in the hook of the recorded access (RIP; for an
 * IN also RAX, RCX, RSI, RDI), keeping where the stop left them; sh_show_stop puts those back.
 * One call each instead of a read and a write per register from Python. */
static int nregs(const struct sh_io *s) { return s->pending == SH_IN ? 5 : 1; }

void sh_show_hook(void *uc, struct sh_io *s)
{
    const int32_t ids[5] = {s->id_rip, s->id_rax, s->id_rcx, s->id_rsi, s->id_rdi};
    const uint64_t *at = &s->rip;
    for (int i = 0; i < nregs(s); i++) {
        s->reg_read(uc, ids[i], &s->after[i]);
        s->reg_write(uc, ids[i], &at[i]);
    }
}

void sh_show_stop(void *uc, struct sh_io *s)
{
    const int32_t ids[5] = {s->id_rip, s->id_rax, s->id_rcx, s->id_rsi, s->id_rdi};
    for (int i = 0; i < nregs(s); i++)
        s->reg_write(uc, ids[i], &s->after[i]);
    s->pending = SH_NONE;
}

/* A UC_HOOK_CODE hook that stops the engine where it is put (uc_cb_hookcode_t: uc_engine *,
 * uint64_t address, uint32_t size, void *user_data): the model's replay of an MMIO
 * instruction puts it on the next instruction, so the engine stops exactly there without an
 * instruction count (a count makes unicorn drop every translated block; sim/core.py step_to). */
void sh_stop_code(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    struct sh_io *s = user_data;
    (void)address;
    (void)size;
    s->emu_stop(uc);
}
